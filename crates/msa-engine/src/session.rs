//! Stage 2 (routing, context assembly, prompt prefill; MSA-SPEC §3.3) and stage 3 (decoding over the
//! frozen per-layer context; §3.4), plus plain dense prefill for Qwen3 checkpoints.

use msa_core::{QueryPrompt, Sampler, SamplingParams};

use crate::backend::{AttentionMask, Backend, RoutingSpec};
use crate::error::{Error, Result};
use crate::layer::Projected;
use crate::memory::{Memory, Stopwatch};
use crate::model::Model;

/// A document selected by one router layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoutedDocument {
    /// Global document id.
    pub id: usize,
    pub score: f32,
}

/// The routing decision of one router layer for one query.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRouting {
    pub layer: usize,
    /// Selected documents, highest score first (ties: lower id first).
    pub documents: Vec<RoutedDocument>,
    /// Memory chunks placed into this layer's context.
    pub chunks: usize,
}

/// What routing one router layer cost: bytes per memory tier and wall time per stage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouteStats {
    pub layer: usize,
    /// Routing-key bytes the scoring read on the device(s).
    pub scanned_bytes: u64,
    /// Content bytes fetched from the bank's host pages (0 for a memory held on the device).
    pub fetched_bytes: u64,
    /// Wall time from recording the routing scores to having the top-k on the host. It includes
    /// waiting for the layer's earlier work on the device, unless the prefill timed routing alone
    /// ([`Model::prefill_query_timing_routing`]). Either way it also covers recording the layer's
    /// projections (the device runs them while the host merges) and, with shards, sending the
    /// router queries to them and waiting for their answers.
    pub routing_time: std::time::Duration,
    /// Wall time to gather the selected documents' pages and record their upload.
    pub fetch_time: std::time::Duration,
}

/// Intermediate tensors of one prefill, recorded on request for tests and debugging.
pub struct Trace<T> {
    /// Token embeddings (layer 0 input).
    pub embeddings: Option<T>,
    /// Output of every decoder layer (residual stream, before the final norm).
    pub hidden: Vec<T>,
    /// Per layer, the attention context `(K, V)` the prompt attended over.
    pub context: Vec<(T, T)>,
    /// Per router layer, `(layer, router queries [n, heads, d])` before any scaling.
    pub router_queries: Vec<(usize, T)>,
    /// Per router layer, `(layer, score of every document)`.
    pub document_scores: Vec<(usize, T)>,
    /// Final RMSNorm output of every position.
    pub final_norm: Option<T>,
    /// Logits of every position.
    pub logits: Option<T>,
    /// Records `document_scores` alone (see [`Trace::document_scores_only`]).
    pub scores_only: bool,
}

impl<T> Trace<T> {
    /// A trace that records only every document's score per router layer: no per-layer tensors and
    /// no logits beyond the last position's, so it costs one small tensor per router layer (what a
    /// routing view such as the browser demo's heat map needs).
    pub fn document_scores_only() -> Self {
        Trace {
            scores_only: true,
            ..Trace::default()
        }
    }

    /// Every document's score (by memory index) per router layer, read back to the host, in
    /// router-layer order.
    pub async fn read_document_scores<B: Backend<Tensor = T>>(
        &self,
        b: &B,
    ) -> Result<Vec<Vec<f32>>> {
        let mut scores = Vec::with_capacity(self.document_scores.len());
        for (_, layer_scores) in &self.document_scores {
            scores.push(b.read(layer_scores).await?);
        }
        Ok(scores)
    }
}

impl<T> Default for Trace<T> {
    fn default() -> Self {
        Trace {
            embeddings: None,
            hidden: Vec::new(),
            context: Vec::new(),
            router_queries: Vec::new(),
            document_scores: Vec::new(),
            final_norm: None,
            logits: None,
            scores_only: false,
        }
    }
}

/// Per-layer attention context of one sequence, and where its next token goes.
pub struct Session<'m, B: Backend> {
    model: &'m Model<B>,
    /// Per layer `(K, V)`: `[context_len, kv_heads, head_dim]`.
    context: Vec<Option<(B::Tensor, B::Tensor)>>,
    next_position: u32,
    routing: Vec<LayerRouting>,
    route_stats: Vec<RouteStats>,
}

/// Routing inputs of a stage-2 prefill.
struct RoutingQuery<'a, B: Backend> {
    memory: &'a Memory<B>,
    rows: Vec<u32>,
    top_k: usize,
    spec: RoutingSpec,
    /// Wait for the device to be idle before each layer's routing clock starts.
    timed_alone: bool,
}

impl<'m, B: Backend> Session<'m, B> {
    /// Routing decisions of the prefill, in router-layer order (empty for dense prefill).
    pub fn routing(&self) -> &[LayerRouting] {
        &self.routing
    }

    /// Bytes and times of the prefill's routing, in router-layer order.
    pub fn route_stats(&self) -> &[RouteStats] {
        &self.route_stats
    }

    /// RoPE position the next token will take.
    pub fn next_position(&self) -> u32 {
        self.next_position
    }

    /// Tokens in each layer's attention context.
    pub fn context_len(&self) -> usize {
        self.context
            .first()
            .and_then(|c| c.as_ref())
            .map_or(0, |(k, _)| self.model.backend.shape(k)[0])
    }

    /// Feeds one token (stage 3) and returns the logits of the next.
    pub async fn decode(&mut self, token: u32) -> Result<Vec<f32>> {
        self.extend(&[token], BlockAttention::Causal, None).await
    }

    /// Feeds one token and picks the next greedily on the backend: only the chosen id and its logit come
    /// back to the host, not the vocabulary's logits. Ties go to the lower id, as in greedy sampling.
    /// A NaN or +inf winner is an error; NaN logits that lose rank below every number and go unreported
    /// (the host sampler, which sees every logit, refuses any NaN).
    pub async fn decode_greedy(&mut self, token: u32) -> Result<u32> {
        let logits = self.feed(&[token], BlockAttention::Causal, None).await?;
        self.greedy(&logits).await
    }

    /// Feeds a block of tokens through the decode path (stage 3: no routing, positions continuing) and
    /// returns the logits of the block's last position. `attention` says how the block's tokens see each
    /// other; Memory Interleave feeds its injected question this way.
    pub async fn extend(
        &mut self,
        ids: &[u32],
        attention: BlockAttention,
        trace: Option<&mut Trace<B::Tensor>>,
    ) -> Result<Vec<f32>> {
        let logits = self.feed(ids, attention, trace).await?;
        self.model.backend.read(&logits).await
    }

    /// The next token after a fed block: chosen on the device when `sampler` is greedy (one id comes
    /// back), sampled on the host from the read-back logits otherwise.
    pub(crate) async fn next_token(
        &mut self,
        ids: &[u32],
        attention: BlockAttention,
        sampler: &mut Sampler,
    ) -> Result<u32> {
        let logits = self.feed(ids, attention, None).await?;
        if sampler.is_greedy() {
            return self.greedy(&logits).await;
        }
        Ok(sampler.sample(&self.model.backend.read(&logits).await?)?)
    }

    async fn greedy(&self, logits: &B::Tensor) -> Result<u32> {
        let b = &self.model.backend;
        let vocab = b.shape(logits)[1];
        let best = b.top_k(&b.reshape(logits, &[vocab])?, 1).await?;
        match best.first() {
            Some(best) if !best.score.is_nan() && best.score != f32::INFINITY => Ok(best.index),
            Some(best) => {
                Err(msa_core::Error::Sampling(format!("logits contain {}", best.score)).into())
            }
            None => Err(msa_core::Error::Sampling("empty logits".into()).into()),
        }
    }

    /// Feeds a block at the next positions; the logits of its last position stay on the device.
    pub(crate) async fn feed(
        &mut self,
        ids: &[u32],
        attention: BlockAttention,
        mut trace: Option<&mut Trace<B::Tensor>>,
    ) -> Result<B::Tensor> {
        self.model.check_ids(ids)?;
        let start = self.next_position;
        let positions: Vec<u32> = (start..start + ids.len() as u32).collect();
        let mask = match attention {
            BlockAttention::Causal => AttentionMask::Causal,
            BlockAttention::Bidirectional => AttentionMask::Full,
        };
        let hidden = self
            .forward(ids, &positions, None, mask, trace.as_deref_mut())
            .await?;
        self.model.last_logits(&hidden, trace)
    }

    /// Runs a block of tokens through every layer, attending over (and extending) the stored context.
    /// Router layers first route and append the selected documents' chunks, when `routing` is given.
    async fn forward(
        &mut self,
        ids: &[u32],
        positions: &[u32],
        routing: Option<&RoutingQuery<'_, B>>,
        mask: AttentionMask<'_>,
        mut trace: Option<&mut Trace<B::Tensor>>,
    ) -> Result<B::Tensor> {
        let model = self.model;
        let b = &model.backend;
        let mut hidden = b.embedding(&model.weights.embed_tokens, ids)?;
        if let Some(t) = trace.as_deref_mut().filter(|t| !t.scores_only) {
            t.embeddings = Some(hidden.clone());
        }
        for layer in 0..model.config.num_hidden_layers {
            // This layer's context: [what it already held | routed memory chunks | this block].
            let mut keys: Vec<B::Tensor> = Vec::with_capacity(2);
            let mut values: Vec<B::Tensor> = Vec::with_capacity(2);
            let (q, k, v) = if let (Some(route), Some((router_q, _))) =
                (routing, &model.weights.layers[layer].router)
            {
                let normed = model.input_norm(layer, &hidden)?;
                let (memory_k, memory_v, p) = self
                    .route(
                        layer,
                        route,
                        normed,
                        positions,
                        router_q,
                        trace.as_deref_mut(),
                    )
                    .await?;
                keys.push(memory_k);
                values.push(memory_v);
                (p.q, p.k, p.v)
            } else {
                model.project(layer, &hidden, positions)?
            };
            keys.push(k);
            values.push(v);
            let (held_k, held_v) = self.context[layer].take().unzip();
            let k = extend_context(b, held_k, keys)?;
            let v = extend_context(b, held_v, values)?;
            hidden = model.attend_and_mlp(layer, &hidden, &q, &k, &v, mask)?;
            if let Some(t) = trace.as_deref_mut().filter(|t| !t.scores_only) {
                t.context.push((k.clone(), v.clone()));
                t.hidden.push(hidden.clone());
            }
            self.context[layer] = Some((k, v));
        }
        self.next_position = positions.last().map_or(self.next_position, |p| p + 1);
        Ok(hidden)
    }

    /// Routes router layer `layer`: selects the global top k documents (on every shard) and fetches
    /// their chunks, returning the memory `(K, V)` to splice into the context and the layer's projections.
    /// The projections are recorded once the routing is submitted, so the device computes them while
    /// the host merges the selection and gathers the selected pages.
    async fn route(
        &mut self,
        layer: usize,
        route: &RoutingQuery<'_, B>,
        normed: B::Tensor,
        positions: &[u32],
        router_q: &B::Weight,
        trace: Option<&mut Trace<B::Tensor>>,
    ) -> Result<(B::Tensor, B::Tensor, Projected<B::Tensor>)> {
        let (model, memory) = (self.model, route.memory);
        let b = &model.backend;
        let slot = memory
            .fingerprint()
            .router_layers
            .iter()
            .position(|&l| l == layer)
            .ok_or_else(|| Error::shape("route", format!("the memory has no layer {layer}")))?;
        let queries = model.project_heads(&normed, router_q, model.config.num_attention_heads)?;
        if route.timed_alone {
            b.synchronize().await?;
        }
        let clock = Stopwatch::start();
        let (selection, projected) = memory
            .select(
                b,
                slot,
                &queries,
                &route.rows,
                route.top_k,
                route.spec,
                trace.is_some(),
                || model.project_normed(layer, normed, positions),
            )
            .await?;
        let routing_time = clock.elapsed();
        if let Some(t) = trace {
            if !t.scores_only {
                t.router_queries.push((layer, queries));
            }
            t.document_scores
                .push((layer, selection.scores.expect("scores were asked for")));
        }
        let mut selected: Vec<usize> = selection.documents.iter().map(|&(id, _)| id).collect();
        selected.sort_unstable();
        let clock = Stopwatch::start();
        let fetched = memory.fetch(b, slot, &selected)?;
        self.routing.push(LayerRouting {
            layer,
            documents: selection
                .documents
                .iter()
                .map(|&(id, score)| RoutedDocument {
                    id: memory.documents()[id].id,
                    score,
                })
                .collect(),
            chunks: fetched.chunks,
        });
        self.route_stats.push(RouteStats {
            layer,
            scanned_bytes: selection.scanned_bytes,
            fetched_bytes: fetched.host_bytes,
            routing_time,
            fetch_time: clock.elapsed(),
        });
        Ok((fetched.k, fetched.v, projected))
    }
}

/// A layer's keys or values after a block: what the context held with `parts` appended (in place,
/// where the backend can: a decoded token copies its own rows, not the context), or the parts alone.
fn extend_context<B: Backend>(
    b: &B,
    held: Option<B::Tensor>,
    mut parts: Vec<B::Tensor>,
) -> Result<B::Tensor> {
    let refs: Vec<&B::Tensor> = parts.iter().collect();
    match held {
        Some(held) => b.append_rows(held, &refs),
        None if parts.len() == 1 => Ok(parts.pop().expect("one part")),
        None => b.concat_rows(&refs),
    }
}

impl<B: Backend> Model<B> {
    fn empty_session(&self, context: Vec<Option<(B::Tensor, B::Tensor)>>) -> Session<'_, B> {
        Session {
            model: self,
            context,
            next_position: 0,
            routing: Vec::new(),
            route_stats: Vec::new(),
        }
    }

    pub(crate) fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let vocab = self.config.vocab_size;
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(&id) => Err(Error::TokenOutOfRange { id, vocab }),
            None => Ok(()),
        }
    }

    /// The logits of a block's last position, on the device (of every position, into `trace`, when
    /// tracing).
    fn last_logits(
        &self,
        hidden: &B::Tensor,
        trace: Option<&mut Trace<B::Tensor>>,
    ) -> Result<B::Tensor> {
        let b = &self.backend;
        let n = b.shape(hidden)[0];
        match trace.filter(|t| !t.scores_only) {
            Some(t) => {
                let (normed, logits) = self.logits(hidden)?;
                let last = b.rows(&logits, n - 1..n)?;
                t.final_norm = Some(normed);
                t.logits = Some(logits);
                Ok(last)
            }
            // A block of one row (a decoded token) is its last position already.
            None if n == 1 => Ok(self.logits(hidden)?.1),
            None => Ok(self.logits(&b.rows(hidden, n - 1..n)?)?.1),
        }
    }

    /// Finishes a prefill: the logits of its last position, read back.
    async fn prefill_logits(
        &self,
        hidden: &B::Tensor,
        trace: Option<&mut Trace<B::Tensor>>,
    ) -> Result<Vec<f32>> {
        self.backend.read(&self.last_logits(hidden, trace)?).await
    }

    /// Plain causal prefill of token ids at positions `0..n` with no memory (dense Qwen3).
    pub async fn prefill_dense(
        &self,
        ids: &[u32],
        mut trace: Option<&mut Trace<B::Tensor>>,
    ) -> Result<(Session<'_, B>, Vec<f32>)> {
        self.check_ids(ids)?;
        let mut session = self.empty_session(vec![None; self.config.num_hidden_layers]);
        let positions: Vec<u32> = (0..ids.len() as u32).collect();
        let hidden = session
            .forward(
                ids,
                &positions,
                None,
                AttentionMask::Causal,
                trace.as_deref_mut(),
            )
            .await?;
        let logits = self.prefill_logits(&hidden, trace).await?;
        Ok((session, logits))
    }

    /// Stage 2 for a prompt against a memory: per router layer, route and splice the selected documents
    /// between the template head and the prompt; positions start at `template_len + doc_top_k`.
    pub async fn prefill_query(
        &self,
        memory: &Memory<B>,
        prompt: &QueryPrompt,
        trace: Option<&mut Trace<B::Tensor>>,
    ) -> Result<(Session<'_, B>, Vec<f32>)> {
        self.prefill_routed(memory, prompt, trace, false).await
    }

    /// [`Model::prefill_query`] with each router layer's routing timed alone: the layer waits for the
    /// device to finish the work queued before it (the earlier layers, its router projection), then
    /// starts the clock of [`RouteStats::routing_time`], which so covers scoring, the top k, its
    /// read-back and the merge, and nothing else. The synchronisation per router layer costs the
    /// overlap of host and device there, so the prefill itself is slower: this is for benchmarks.
    pub async fn prefill_query_timing_routing(
        &self,
        memory: &Memory<B>,
        prompt: &QueryPrompt,
    ) -> Result<(Session<'_, B>, Vec<f32>)> {
        self.prefill_routed(memory, prompt, None, true).await
    }

    async fn prefill_routed(
        &self,
        memory: &Memory<B>,
        prompt: &QueryPrompt,
        mut trace: Option<&mut Trace<B::Tensor>>,
        timed_alone: bool,
    ) -> Result<(Session<'_, B>, Vec<f32>)> {
        let msa = self.msa_config("querying a memory")?;
        self.check_memory(memory)?;
        self.check_ids(&prompt.ids)?;
        if memory.is_empty() {
            return Err(Error::NoDocuments);
        }
        let rows = prompt.routing_positions();
        if rows.is_empty() {
            return Err(Error::EmptyQuestion);
        }
        let b = &self.backend;
        let template_len = b.shape(&memory.template(0).0)[0] as u32;
        let route = RoutingQuery {
            memory,
            rows,
            top_k: msa.doc_top_k.min(memory.documents().len()),
            spec: RoutingSpec {
                score_mode: memory.score_mode(),
                head_reduce: msa.head_reduce,
                query_reduce: msa.query_reduce,
                chunk_reduce: msa.chunk_reduce,
            },
            timed_alone,
        };
        let context = (0..self.config.num_hidden_layers)
            .map(|l| Some(memory.template(l).clone()))
            .collect();
        let mut session = self.empty_session(context);
        // The reference offsets prompt positions by the template plus k, the nominal memory slots.
        let start = template_len + msa.doc_top_k as u32;
        let positions: Vec<u32> = (start..start + prompt.ids.len() as u32).collect();
        let hidden = session
            .forward(
                &prompt.ids,
                &positions,
                Some(&route),
                AttentionMask::Causal,
                trace.as_deref_mut(),
            )
            .await?;
        let logits = self.prefill_logits(&hidden, trace).await?;
        Ok((session, logits))
    }

    /// Builds the stage-2 prompt of a question and prefills it against a memory.
    pub async fn prefill_question(
        &self,
        memory: &Memory<B>,
        question: &str,
    ) -> Result<(Session<'_, B>, Vec<f32>)> {
        self.prefill_question_traced(memory, question, None).await
    }

    /// [`Model::prefill_question`], recording into `trace`.
    pub async fn prefill_question_traced(
        &self,
        memory: &Memory<B>,
        question: &str,
        trace: Option<&mut Trace<B::Tensor>>,
    ) -> Result<(Session<'_, B>, Vec<f32>)> {
        if question.trim().is_empty() {
            return Err(Error::EmptyQuestion);
        }
        let prompt = self.require_tokenizer()?.question_prompt(question)?;
        self.prefill_query(memory, &prompt, trace).await
    }

    /// Answers a question from a memory: a token stream (see [`Generation`]).
    pub async fn ask(
        &self,
        memory: &Memory<B>,
        question: &str,
        options: &GenerateOptions,
    ) -> Result<Generation<'_, B>> {
        let (session, logits) = self.prefill_question(memory, question).await?;
        self.generation(session, logits, options)
    }

    /// Continues a prefilled session as a token stream.
    pub fn generation<'m>(
        &'m self,
        session: Session<'m, B>,
        logits: Vec<f32>,
        options: &GenerateOptions,
    ) -> Result<Generation<'m, B>> {
        Ok(Generation {
            session,
            sampler: Sampler::new(options.sampling)?,
            logits: Some(logits),
            pending: None,
            produced: 0,
            max_tokens: options.max_tokens,
            stop_tokens: options
                .stop_tokens
                .clone()
                .unwrap_or_else(|| self.config.eos_token_ids.clone()),
            finish: None,
        })
    }
}

/// How the tokens of a block fed through the decode path attend to each other (each sees the whole
/// context before the block either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BlockAttention {
    /// Token `i` of the block sees the block's tokens up to itself, as if fed one at a time: what the
    /// model saw in training.
    #[default]
    Causal,
    /// Every token of the block sees every other. The reference's decode path does this to a
    /// multi-token input (MSA-SPEC §3.4): choose it for exact parity with the reference.
    Bidirectional,
}

/// Settings of a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end the answer; `None` uses the config's `eos_token_id`.
    pub stop_tokens: Option<Vec<u32>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: SamplingParams::greedy(),
            stop_tokens: None,
        }
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was produced (it is the last token yielded).
    Stop,
    /// `max_tokens` tokens were produced.
    Length,
    /// A decoding step failed; [`Generation::next_token`] returned its error.
    Error,
}

/// A token stream over a prefilled session: each [`Generation::next_token`] samples one token and, on the
/// following call, feeds it back through the decode path.
pub struct Generation<'m, B: Backend> {
    session: Session<'m, B>,
    sampler: Sampler,
    logits: Option<Vec<f32>>,
    pending: Option<u32>,
    produced: usize,
    max_tokens: usize,
    stop_tokens: Vec<u32>,
    finish: Option<FinishReason>,
}

impl<'m, B: Backend> Generation<'m, B> {
    pub fn session(&self) -> &Session<'m, B> {
        &self.session
    }

    pub fn routing(&self) -> &[LayerRouting] {
        self.session.routing()
    }

    /// Why the stream ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// The next token, or `None` once a stop token or the token limit was reached. After an error the
    /// stream is over: the session's context may be partly updated.
    pub async fn next_token(&mut self) -> Result<Option<u32>> {
        let step = self.step().await;
        if step.is_err() {
            self.finish = Some(FinishReason::Error);
        }
        step
    }

    async fn step(&mut self) -> Result<Option<u32>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        if self.produced >= self.max_tokens {
            self.finish = Some(FinishReason::Length);
            return Ok(None);
        }
        let token = match self.pending.take() {
            // Greedy decoding reads back one id per token instead of the vocabulary's logits.
            Some(previous) => {
                self.session
                    .next_token(&[previous], BlockAttention::Causal, &mut self.sampler)
                    .await?
            }
            None => {
                let logits = self.logits.take().expect("logits follow every prefill");
                self.sampler.sample(&logits)?
            }
        };
        self.produced += 1;
        if self.stop_tokens.contains(&token) {
            self.finish = Some(FinishReason::Stop);
        } else {
            self.pending = Some(token);
        }
        Ok(Some(token))
    }

    /// Drains the stream into a vector.
    pub async fn collect_tokens(&mut self) -> Result<Vec<u32>> {
        let mut tokens = Vec::new();
        while let Some(t) = self.next_token().await? {
            tokens.push(t);
        }
        Ok(tokens)
    }
}
