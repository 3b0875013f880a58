//! # msa — a portable runtime for Memory Sparse Attention models
//!
//! Load an MSA checkpoint (or a plain Qwen3 one), encode documents into a memory once, then ask questions:
//! every router layer scores all documents, keeps the top k, and attends over their chunk-pooled K/V.
//!
//! ```no_run
//! use msa::{Msa, GenerateOptions};
//!
//! let msa = Msa::load("path/to/MSA-4B")?;
//! let memory = msa.encode(&["Erik Watts is the son of Bill Watts.", "Bill Watts was born May 5, 1939."])?;
//! let answer = msa.ask(&memory, "When was Erik Watts' father born?", &GenerateOptions::default())?;
//! for layer in &answer.routing {
//!     println!("layer {}: documents {:?}", layer.layer, layer.documents);
//! }
//! println!("{}", answer.text);
//! # Ok::<(), msa::Error>(())
//! ```
//!
//! [`Msa::load`] runs on the CPU reference backend; [`Msa::load_wgpu`] runs every op as a WGSL compute
//! shader on the best GPU adapter (`WGPU_BACKEND`, `WGPU_ADAPTER_NAME` choose another);
//! [`Msa::load_cuda`] runs on an NVIDIA GPU through CUDA. Calls block. The async, backend-generic engine
//! underneath is re-exported as [`engine`], [`wgpu`], [`cuda`] and [`core`] for embedders that bring their
//! own executor or backend; [`shard`] serves and reaches Memory Parallel shards in other processes.

use std::path::Path;

pub use msa_core as core;
pub use msa_cuda as cuda;
pub use msa_engine as engine;
pub use msa_shard as shard;
pub use msa_wgpu as wgpu;

pub use msa_core::bank::{Bank, OpenOptions};
pub use msa_core::{ModelConfig, SamplingParams, ScoreMode};
pub use msa_engine::{
    Backend, BankEncodeOptions, BankEncodeReport, BlockAttention, CpuBackend, EncodeProgress,
    Error, FinishReason, GenerateOptions, InterleaveEvent, InterleaveFinish, InterleaveOptions,
    InterleaveOutcome, LayerRouting, Memory, MemoryDocument, MemoryFingerprint, Phase, Result,
    RetrievalEnd, RouteStats, RoutedDocument, SourceDocument,
};

/// A model on a backend (the CPU reference unless chosen otherwise), with blocking calls.
pub struct Msa<B: Backend = CpuBackend> {
    model: msa_engine::Model<B>,
}

/// A finished answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub tokens: Vec<u32>,
    pub text: String,
    /// Documents selected by every router layer.
    pub routing: Vec<LayerRouting>,
    pub finish_reason: FinishReason,
}

impl Msa {
    /// Loads `config.json`, the safetensors weights and `tokenizer.json` from a model directory onto the
    /// CPU reference backend.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        Msa::load_on(dir, CpuBackend::new())
    }
}

impl Msa<msa_wgpu::WgpuBackend> {
    /// Loads a model onto the GPU through wgpu (adapter chosen as [`msa_wgpu::DeviceOptions::from_env`]
    /// says). Fails with a clear error when no adapter exists.
    pub fn load_wgpu(dir: impl AsRef<Path>) -> Result<Self> {
        let gpu = pollster::block_on(msa_wgpu::WgpuBackend::new(
            msa_wgpu::DeviceOptions::from_env(),
        ))?;
        Msa::load_on(dir, gpu)
    }
}

impl Msa<msa_cuda::CudaBackend> {
    /// Loads a model onto the first CUDA GPU. Fails with a clear error when the driver, NVRTC or
    /// cuBLAS cannot be loaded, or no device exists.
    pub fn load_cuda(dir: impl AsRef<Path>) -> Result<Self> {
        Msa::load_on(
            dir,
            msa_cuda::CudaBackend::new(msa_cuda::CudaOptions::default())?,
        )
    }
}

impl<B: Backend> Msa<B> {
    /// Loads a model directory onto `backend`.
    pub fn load_on(dir: impl AsRef<Path>, backend: B) -> Result<Self> {
        Ok(Msa {
            model: msa_engine::Model::load(dir, backend)?,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    /// The engine model underneath, for token-level and traced calls.
    pub fn model(&self) -> &msa_engine::Model<B> {
        &self.model
    }

    /// Encodes documents into a new memory (stage 1). Document `i` gets id `i`.
    pub fn encode(&self, documents: &[impl AsRef<str>]) -> Result<Memory<B>> {
        self.encode_with_progress(documents, |_| {})
    }

    /// [`Msa::encode`], reporting progress after every document.
    pub fn encode_with_progress(
        &self,
        documents: &[impl AsRef<str>],
        progress: impl FnMut(EncodeProgress),
    ) -> Result<Memory<B>> {
        pollster::block_on(self.model.encode_documents(documents, progress))
    }

    /// Appends documents to a memory; their ids continue after the existing ones.
    pub fn add_documents(
        &self,
        memory: &mut Memory<B>,
        documents: &[impl AsRef<str>],
    ) -> Result<()> {
        pollster::block_on(self.model.add_documents(memory, documents, |_| {}))
    }

    /// Creates an empty memory bank for this model in `dir` (see [`Bank`] for the format).
    pub fn create_bank(&self, dir: impl AsRef<Path>) -> Result<Bank> {
        pollster::block_on(self.model.create_bank(dir))
    }

    /// Encodes the corpus documents a bank does not hold yet and appends them, committing every
    /// [`BankEncodeOptions::commit_tokens`] tokens: re-running an interrupted encoding resumes it.
    pub fn encode_into_bank(
        &self,
        bank: &mut Bank,
        corpus: &[SourceDocument],
        options: BankEncodeOptions,
        progress: impl FnMut(EncodeProgress),
    ) -> Result<BankEncodeReport> {
        pollster::block_on(self.model.encode_into_bank(bank, corpus, options, progress))
    }

    /// Opens a bank (checksums verified) as a memory: routing keys on this model's device, content in
    /// the bank's host pages.
    pub fn open_bank(&self, dir: impl AsRef<Path>) -> Result<Memory<B>> {
        self.open_bank_on(dir, Vec::new())
    }

    /// Opens a bank with its routing keys sharded over `devices` (Memory Parallel): each scores its
    /// documents and the host merges the top k. No devices means this model's device.
    pub fn open_bank_on(&self, dir: impl AsRef<Path>, devices: Vec<B>) -> Result<Memory<B>> {
        let bank = Bank::open(dir, OpenOptions::default())?;
        self.model.open_memory(bank, devices)
    }

    /// [`Msa::open_bank_on`] with shards served by other processes or machines after the local ones,
    /// such as [`shard::ShardClient`]s connected to `msa shard` servers (with a device link between the GPUs
    /// where both backends make one: [`shard::ShardClient::link`]).
    pub fn open_bank_with(
        &self,
        dir: impl AsRef<Path>,
        devices: Vec<B>,
        remotes: Vec<Box<dyn engine::RemoteShard<B>>>,
    ) -> Result<Memory<B>> {
        let bank = Bank::open(dir, OpenOptions::default())?;
        self.model.open_memory_with(bank, devices, remotes)
    }

    /// Answers a question from a memory.
    pub fn ask(
        &self,
        memory: &Memory<B>,
        question: &str,
        options: &GenerateOptions,
    ) -> Result<Answer> {
        self.ask_streaming(memory, question, options, |_, _| {})
    }

    /// Answers a question with Memory Interleave, as MSA was trained to: rounds of naming documents
    /// (`[4]<|object_ref_end|>`), reading their text and routing again, until the model writes
    /// `<End-of-Retrieve>` and answers (MSA-SPEC §4.5). `on_event` hears every round, routing decision,
    /// injection and token.
    ///
    /// ```no_run
    /// use msa::{InterleaveEvent, InterleaveOptions, Msa};
    ///
    /// let msa = Msa::load("path/to/MSA-4B")?;
    /// let memory = msa.encode(&["Erik Watts is the son of Bill Watts.", "Bill Watts was born May 5, 1939."])?;
    /// let outcome = msa.ask_interleaved(&memory, "When was Erik Watts' father born?",
    ///     &InterleaveOptions::default(), |event| {
    ///         if let InterleaveEvent::DocumentsInjected { round, ids, .. } = event {
    ///             println!("round {round} read documents {ids:?}");
    ///         }
    ///     })?;
    /// println!("{:?}: {:?}", outcome.finish, outcome.answer);
    /// # Ok::<(), msa::Error>(())
    /// ```
    pub fn ask_interleaved(
        &self,
        memory: &Memory<B>,
        question: &str,
        options: &InterleaveOptions,
        on_event: impl FnMut(InterleaveEvent),
    ) -> Result<InterleaveOutcome> {
        pollster::block_on(self.model.interleave(memory, question, options, on_event))
    }

    /// Answers a question, calling `on_token(id, text piece)` as each token is produced. A piece is empty
    /// while the token ends inside a multi-byte character; the pieces always add up to `Answer::text`.
    pub fn ask_streaming(
        &self,
        memory: &Memory<B>,
        question: &str,
        options: &GenerateOptions,
        on_token: impl FnMut(u32, &str),
    ) -> Result<Answer> {
        pollster::block_on(async {
            let generation = self.model.ask(memory, question, options).await?;
            self.stream(generation, on_token).await
        })
    }

    /// Continues `prompt` without any memory: plain causal generation, as for a dense Qwen3 checkpoint.
    /// The prompt is used as is (no chat template is applied).
    pub fn generate(&self, prompt: &str, options: &GenerateOptions) -> Result<Answer> {
        self.generate_streaming(prompt, options, |_, _| {})
    }

    /// [`Msa::generate`], calling `on_token(id, text piece)` as each token is produced.
    pub fn generate_streaming(
        &self,
        prompt: &str,
        options: &GenerateOptions,
        on_token: impl FnMut(u32, &str),
    ) -> Result<Answer> {
        let ids = self.model.require_tokenizer()?.encode(prompt)?;
        pollster::block_on(async {
            let (session, logits) = self.model.prefill_dense(&ids, None).await?;
            let generation = self.model.generation(session, logits, options)?;
            self.stream(generation, on_token).await
        })
    }

    async fn stream(
        &self,
        mut generation: msa_engine::Generation<'_, B>,
        mut on_token: impl FnMut(u32, &str),
    ) -> Result<Answer> {
        let tokenizer = self.model.require_tokenizer()?;
        let mut text = msa_core::TextStream::new(tokenizer);
        let mut tokens = Vec::new();
        while let Some(token) = generation.next_token().await? {
            on_token(token, &text.push(token)?);
            tokens.push(token);
        }
        let rest = text.finish()?;
        if !rest.is_empty() {
            // A character cut off by the end of generation: release it with the last token.
            on_token(*tokens.last().expect("text implies a token"), &rest);
        }
        Ok(Answer {
            text: tokenizer.decode(&tokens)?,
            routing: generation.routing().to_vec(),
            finish_reason: generation
                .finish_reason()
                .expect("a drained generation has finished"),
            tokens,
        })
    }
}
