//! Next-token selection: greedy, temperature and nucleus (top-p) sampling with a seedable generator.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Sampling settings. `temperature == 0` is greedy, as in the reference (`do_sample=False`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Sampling(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Sampling(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Draws tokens from logits according to [`SamplingParams`].
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: StdRng::seed_from_u64(params.seed),
        })
    }

    /// Whether this sampler always takes the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0
    }

    /// Picks the next token id from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::Sampling("empty logits".into()));
        }
        // -inf marks a masked token; NaN or +inf means the forward pass went wrong.
        if let Some(bad) = logits.iter().find(|l| l.is_nan() || **l == f32::INFINITY) {
            return Err(Error::Sampling(format!("logits contain {bad}")));
        }
        if self.params.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        // Softmax at temperature, then the smallest set of most likely tokens whose mass reaches top_p.
        // Divide rather than multiply by 1/t: a tiny t then gives 0/t = 0 for the top token, not 0·inf.
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(Error::Sampling("every token is masked (-inf)".into()));
        }
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0.0f32;
        let mut cut = probs.len();
        for (i, p) in probs.iter().enumerate() {
            kept += p.1 / total;
            if kept >= self.params.top_p {
                cut = i + 1;
                break;
            }
        }
        probs.truncate(cut);
        let mass: f32 = probs.iter().map(|p| p.1).sum();
        let mut draw = self.rng.random::<f32>() * mass;
        for &(id, p) in &probs {
            if draw < p {
                return Ok(id);
            }
            draw -= p;
        }
        Ok(probs.last().map(|p| p.0).unwrap_or(0))
    }
}

/// Index of the largest value; the first one on ties, like `torch.argmax`.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]).unwrap(), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_top_p() {
        let logits = [2.0, 1.0, 0.5, -3.0, 1.5];
        let params = SamplingParams {
            temperature: 0.8,
            top_p: 1.0,
            seed: 7,
        };
        let draws = |p: SamplingParams| {
            let mut s = Sampler::new(p).unwrap();
            (0..200)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(params), draws(params));
        assert!(
            draws(params)
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 2
        );
        // top_p small enough keeps only the most likely token.
        let narrow = draws(SamplingParams {
            top_p: 0.05,
            ..params
        });
        assert!(narrow.iter().all(|&t| t == 0));
    }

    #[test]
    fn rejects_bad_parameters_and_logits() {
        assert!(
            Sampler::new(SamplingParams {
                temperature: -1.0,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            Sampler::new(SamplingParams {
                top_p: 0.0,
                ..Default::default()
            })
            .is_err()
        );
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert!(s.sample(&[]).is_err());
        assert!(s.sample(&[f32::NAN]).is_err());
        assert!(s.sample(&[0.0, f32::INFINITY]).is_err());
    }

    #[test]
    fn tiny_temperature_is_greedy_and_masked_tokens_are_never_drawn() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1e-40,
            top_p: 1.0,
            seed: 3,
        })
        .unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.5, 2.0, 1.9, -7.0]).unwrap(), 1);
        }
        let mut hot = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_p: 1.0,
            seed: 3,
        })
        .unwrap();
        for _ in 0..200 {
            assert_ne!(hot.sample(&[0.0, f32::NEG_INFINITY, 0.0]).unwrap(), 1);
        }
    }
}
