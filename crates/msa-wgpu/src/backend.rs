//! [`WgpuBackend`]: the engine's [`Backend`] trait on wgpu compute shaders.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;

use msa_core::{ChunkReduce, DType, HeadReduce, QueryReduce, ScoreMode, TensorView};
use msa_engine::backend::{AttentionMask, Backend, RoutingSpec, Scored};
use msa_engine::shapes::{self, AttentionDims, RoutingDims};
use msa_engine::{Error, Result, RopeTableCache, select_top_k};

use crate::context::{ExecutionStats, GpuContext, Window, bind};
use crate::device::{self, Capabilities, DeviceOptions};
use crate::error::WgpuError;
use crate::kernels::{Family, Kernel};

/// Invocations per workgroup of the one-invocation-per-element kernels.
const LANES: usize = 64;
/// Candidates one top-k workgroup reduces (WG × ITEMS in topk.wgsl).
const TOP_K_BLOCK: usize = 1024;
/// Largest k selected on the device; larger selections sort on the host.
const MAX_DEVICE_K: usize = 256;
/// Largest head dim of the attention kernel (its 16-byte words at most WG, GROUP × them in q_tile, in
/// attention.wgsl).
const MAX_HEAD_DIM: usize = 256;
/// Rows and columns of a block of the workgroup-tiled GEMM, and its step along `inner` (`TILE` in
/// matmul.wgsl).
const MATMUL_TILE: usize = 32;
/// Split-KV attention: when rows × head groups give fewer workgroups than this, the keys are split
/// (a split at least one tile of keys) until they do, up to `MAX_SPLITS`.
const ATTENTION_WORKGROUPS: usize = 256;
const MAX_SPLITS: usize = 32;
/// Query heads sharing a KV head that one attention workgroup takes at once (`GROUP`, at most).
const MAX_ATTENTION_GROUP: usize = 4;

/// An f32 tensor in a device buffer; clones share the buffer.
#[derive(Clone, Debug)]
pub struct WgpuTensor {
    /// Counted here too (wgpu's handle is one already), so that [`Backend::append_rows`] knows when
    /// this tensor is the buffer's only holder.
    buffer: Arc<wgpu::Buffer>,
    shape: Vec<usize>,
}

impl WgpuTensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn len(&self) -> usize {
        self.shape.iter().product()
    }

    fn bytes(&self) -> u64 {
        self.len() as u64 * 4
    }

    /// The tensor as the one part of a row-major weight.
    fn whole(&self) -> Part {
        Part {
            buffer: (*self.buffer).clone(),
            rows: 0..shapes::rows_and_width(&self.shape).0,
        }
    }
}

/// A tensor's buffer, counted. In a browser nothing is shared between threads (wgpu's buffers are not
/// `Send` there), and the count is only read to know whether one tensor holds the buffer.
#[cfg_attr(
    target_arch = "wasm32",
    expect(clippy::arc_with_non_send_sync, reason = "one thread in a browser")
)]
fn counted(buffer: wgpu::Buffer) -> Arc<wgpu::Buffer> {
    Arc::new(buffer)
}

/// A weight in its stored dtype, packed into a device buffer, or split by rows into several when it is
/// larger than the device's largest buffer (a browser's 256 MiB against MSA-4B's 778 MB embedding).
#[derive(Debug)]
pub struct WgpuWeight {
    parts: Vec<Part>,
    shape: Vec<usize>,
    dtype: DType,
}

impl WgpuWeight {
    /// How many buffers hold the weight.
    pub fn buffers(&self) -> usize {
        self.parts.len()
    }

    /// The buffer of a weight that is never split (1-D weights: see `upload_weight`).
    fn whole(&self) -> &wgpu::Buffer {
        &self.parts[0].buffer
    }
}

/// Rows `rows` of a row-major tensor, stored from byte 0 of `buffer`.
#[derive(Clone, Debug)]
struct Part {
    buffer: wgpu::Buffer,
    rows: Range<usize>,
}

fn dtype_code(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

/// Checks what the reductions' register exchanges assume (shaders/subgroup_layout.wgsl), on one
/// pipeline: that an invocation's subgroup lane is its index in the workgroup modulo a subgroup size of
/// at least `SUBGROUP`, and that the exchange sums each aligned run of `SUBGROUP` invocations. WebGPU
/// does not promise the layout; where a device differs, or cannot compile the check, the reductions
/// keep to workgroup memory, with a warning.
async fn check_subgroup_layout(ctx: &mut GpuContext) -> Result<()> {
    let width = ctx.caps.subgroup_width;
    if width == 1 {
        return Ok(());
    }
    let kernel = Kernel::new(Family::SubgroupLayout, "subgroup_layout");
    let problem = match ctx.try_pipeline(&kernel).await {
        Err(e) => Some(format!("the subgroup check does not compile ({e})")),
        Ok(()) => {
            const LANES: u32 = 64;
            let bytes = u64::from(LANES) * 16;
            let lanes = ctx.storage(bytes, "subgroup layout")?;
            ctx.dispatch(&kernel, &[LANES], &[bind(2, &lanes)], 1)?;
            let words: Vec<u32> =
                bytemuck::pod_collect_to_vec(&ctx.read_bytes(&lanes, bytes).await?);
            misplaced_lane(&words, width).map(|(index, lane, size, sum)| {
                format!(
                    "invocation {index} of a workgroup is lane {lane} of a subgroup of {size} and its \
                     run of {width} sums to {sum}"
                )
            })
        }
    };
    if let Some(problem) = problem {
        tracing::warn!("{problem}: reductions use workgroup memory only");
        ctx.caps.subgroup_width = 1;
        ctx.caps.variants.subgroups = false;
    }
    Ok(())
}

/// The first invocation of `lanes` ((lane, size, run sum, 0) by invocation index) that breaks what the
/// reductions assume for runs of `width`: (index, lane, size, run sum).
fn misplaced_lane(lanes: &[u32], width: u32) -> Option<(u32, u32, u32, u32)> {
    (0u32..)
        .zip(lanes.chunks_exact(4))
        .map(|(index, word)| (index, word[0], word[1], word[2]))
        .find(|&(index, lane, size, sum)| {
            let first = index / width * width;
            let run_sum = width * first + width * (width - 1) / 2;
            !(size >= width && size.is_power_of_two() && lane == index % size && sum == run_sum)
        })
}

/// The wgpu backend. Cheap to clone; clones share the device.
#[derive(Clone)]
pub struct WgpuBackend {
    pub(crate) ctx: Arc<GpuContext>,
    rope: Arc<RopeTableCache<wgpu::Buffer>>,
}

impl WgpuBackend {
    /// Opens the adapter chosen by `options` (see [`DeviceOptions`]).
    // In a browser wgpu's handles are neither Send nor Sync; the Arc only shares one context between
    // clones of the backend on the one thread there is.
    #[cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]
    pub async fn new(options: DeviceOptions) -> std::result::Result<Self, WgpuError> {
        let adapter = device::select_adapter(&options).await?;
        let (device, queue, caps) = device::open_device(&adapter, &options).await?;
        let mut ctx = GpuContext::new(device, queue, adapter.get_info(), caps);
        check_subgroup_layout(&mut ctx)
            .await
            .map_err(|e| WgpuError::RequestDevice {
                adapter: adapter.get_info().name,
                reason: format!("checking the subgroup layout: {e}"),
            })?;
        tracing::info!(adapter = %adapter.get_info().name, caps = %ctx.caps, "wgpu device opened");
        Ok(WgpuBackend {
            ctx: Arc::new(ctx),
            rope: Arc::default(),
        })
    }

    /// For test suites: the backend on the environment's adapter, or `None` (with a message) when there
    /// is none. When `CI` or `MSA_REQUIRE_GPU` is set a missing adapter panics instead, so a machine
    /// meant to run GPU tests cannot pass them by skipping.
    pub async fn open_or_skip(options: DeviceOptions) -> Option<Self> {
        match WgpuBackend::new(options).await {
            Ok(gpu) => Some(gpu),
            Err(e)
                if ["CI", "MSA_REQUIRE_GPU"]
                    .iter()
                    .any(|v| std::env::var_os(v).is_some()) =>
            {
                panic!("CI or MSA_REQUIRE_GPU is set and no wgpu adapter opened: {e}")
            }
            Err(e) => {
                eprintln!("skipping the wgpu run: {e}");
                None
            }
        }
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.ctx.info
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.ctx.caps
    }

    /// Frees the device and everything on it (weights, memory, tensors) now, rather than when the last
    /// clone of the backend is dropped: a browser page reclaims GPU memory this way. The device is then
    /// lost, as after a driver reset: ops fail with [`Error::DeviceLost`] once wgpu reports the loss,
    /// and work recorded before that fails when it is read back.
    pub fn destroy(&self) {
        self.ctx.device.destroy();
    }

    /// Dispatches, submits and readbacks so far.
    pub fn stats(&self) -> ExecutionStats {
        self.ctx.stats()
    }

    fn tensor(&self, elements: usize, shape: Vec<usize>, label: &str) -> Result<WgpuTensor> {
        debug_assert_eq!(elements, shape.iter().product::<usize>());
        Ok(WgpuTensor {
            buffer: counted(self.ctx.storage(elements as u64 * 4, label)?),
            shape,
        })
    }

    fn upload_u32(&self, values: &[u32], label: &str) -> Result<wgpu::Buffer> {
        self.ctx.storage_with(bytemuck::cast_slice(values), label)
    }

    /// Activations are bound whole; they must fit one binding.
    fn fits(&self, tensors: &[&WgpuTensor], op: &str) -> Result<()> {
        tensors.iter().try_for_each(|t| {
            self.ctx
                .fits(&t.buffer, || format!("{op} on {:?}", t.shape))
        })
    }

    /// Binding windows over every part of a row-major tensor with `row_elements` elements of
    /// `element_bytes` per row; window rows count from the tensor's first row.
    fn part_windows<'p>(
        &self,
        what: &str,
        parts: &'p [Part],
        row_elements: usize,
        element_bytes: usize,
    ) -> Result<Vec<(&'p wgpu::Buffer, Window)>> {
        let mut windows = Vec::new();
        for part in parts {
            let first = part.rows.start;
            for window in self.ctx.windows(
                what,
                part.buffer.size(),
                part.rows.len(),
                row_elements,
                element_bytes,
            )? {
                let rows = window.rows.start + first..window.rows.end + first;
                windows.push((&part.buffer, Window { rows, ..window }));
            }
        }
        Ok(windows)
    }

    /// Gathers rows `ids` of the row-major `src` (`width` elements of `dtype` per row) into a new
    /// `[ids, width]` tensor, binding the source in windows when it is larger than one binding.
    fn gather(
        &self,
        src: &[Part],
        dtype: DType,
        width: usize,
        ids: &[u32],
        shape: Vec<usize>,
    ) -> Result<WgpuTensor> {
        let out = self.tensor(ids.len() * width, shape, "gather")?;
        self.fits(&[&out], "gather")?;
        if ids.is_empty() {
            return Ok(out);
        }
        let ids_buffer = self.upload_u32(ids, "ids")?;
        let kernel = Kernel::new(Family::Gather, "gather").with("DTYPE", dtype_code(dtype));
        let elements = ids.len() * width;
        for (buffer, window) in self.part_windows("gather", src, width, dtype.size_in_bytes())? {
            let params = [
                elements as u32,
                width as u32,
                window.rows.start as u32,
                window.rows.end as u32,
                window.base,
            ];
            self.ctx.dispatch(
                &kernel,
                &params,
                &[
                    bind(1, &ids_buffer),
                    bind(2, buffer).window(window.offset, window.size),
                    bind(3, &out.buffer),
                ],
                elements.div_ceil(LANES),
            )?;
        }
        Ok(out)
    }

    /// A row norm (see norm.wgsl); `width` is the checked last dimension.
    fn norm(&self, x: &WgpuTensor, width: usize, norm: Norm<'_>, eps: f32) -> Result<WgpuTensor> {
        let rows = x.len() / width;
        let out = self.tensor(x.len(), x.shape.clone(), "norm")?;
        self.fits(&[x, &out], "norm")?;
        let (mode, dtype, w, heads) = match norm {
            Norm::Rms(w) => (0, w.dtype, w.whole(), 0),
            Norm::L2 => (1, DType::F32, &self.ctx.placeholder, 0),
            Norm::RmsRope { weight, heads, .. } => (2, weight.dtype, weight.whole(), heads),
        };
        let table = match norm {
            Norm::RmsRope { table, .. } => table,
            _ => &self.ctx.placeholder,
        };
        let kernel = Kernel::new(Family::Norm, "norm")
            .with("MODE", mode)
            .with("DTYPE", dtype_code(dtype));
        self.ctx.dispatch(
            &kernel,
            &[rows as u32, width as u32, eps.to_bits(), heads as u32],
            &[
                bind(1, &x.buffer),
                bind(2, w),
                bind(3, &out.buffer),
                bind(4, table),
            ],
            rows,
        )?;
        Ok(out)
    }

    fn elementwise(
        &self,
        op: u32,
        a: &WgpuTensor,
        b: &WgpuTensor,
        name: &'static str,
    ) -> Result<WgpuTensor> {
        shapes::same_shape(name, &a.shape, &b.shape)?;
        self.fits(&[a, b], name)?;
        let out = self.tensor(a.len(), a.shape.clone(), name)?;
        self.ctx.dispatch(
            &Kernel::new(Family::Elementwise, "elementwise").with("OP", op),
            &[a.len() as u32],
            &[bind(1, &a.buffer), bind(2, &b.buffer), bind(3, &out.buffer)],
            a.len().div_ceil(LANES),
        )?;
        Ok(out)
    }

    fn rope_buffer(&self, positions: &[u32], theta: f64, d: usize) -> Result<wgpu::Buffer> {
        self.rope.get(positions, theta, d, |table| {
            self.ctx
                .storage_with(bytemuck::cast_slice(table), "rope cos/sin")
        })
    }

    /// Scores chunks then documents, as `routing_scores` describes; `q` is the prepared routing query
    /// `[tokens, heads, d]`.
    fn score(
        &self,
        q: &WgpuTensor,
        keys: &WgpuWeight,
        doc_chunk_offsets: &[u32],
        dims: RoutingDims,
        spec: RoutingSpec,
        scale: f32,
    ) -> Result<WgpuTensor> {
        let tokens = q.shape[0];
        let row = dims.kv_heads * dims.d;
        let chunk_scores = self.tensor(dims.chunks, vec![dims.chunks], "chunk scores")?;
        let doc_scores = self.tensor(dims.documents, vec![dims.documents], "document scores")?;
        self.fits(&[&chunk_scores, &doc_scores], "routing_scores")?;
        let flag = |b: bool| u32::from(b);
        let params = |chunks: usize, chunk_start: usize, key_base: u32, q_heads: usize| {
            [
                chunks as u32,
                chunk_start as u32,
                key_base,
                tokens as u32,
                q_heads as u32,
                dims.kv_heads as u32,
                dims.d as u32,
                flag(spec.head_reduce == HeadReduce::Mean),
                flag(spec.query_reduce == QueryReduce::Mean),
                flag(spec.chunk_reduce == ChunkReduce::Mean),
                dims.documents as u32,
                scale.to_bits(),
                (1.0 / dims.heads as f32).to_bits(),
                // Keys are read in 16-byte words when every head's keys start on one.
                flag(on_words(keys.dtype, dims.d, key_base)),
            ]
        };
        // The head mean reads each key once per KV head: sum every group's query heads first.
        let (q, q_heads) = if spec.head_reduce == HeadReduce::Mean && dims.heads > dims.kv_heads {
            let summed = self.tensor(
                tokens * row,
                vec![tokens, dims.kv_heads, dims.d],
                "summed query",
            )?;
            self.ctx.dispatch(
                &Kernel::new(Family::Routing, "sum_groups"),
                &params(0, 0, 0, dims.heads),
                &[bind(1, &q.buffer), bind(7, &summed.buffer)],
                (tokens * row).div_ceil(LANES),
            )?;
            (summed, dims.kv_heads)
        } else {
            (q.clone(), dims.heads)
        };
        // Keys stay in their stored dtype and are widened in the kernel. Window offsets are multiples
        // of 16 bytes, so element parity (which half of a packed word) is the same in a window as in
        // the buffer, and `window.base` counts elements of the stored dtype. Up to 4 query tokens
        // share each pass over the keys.
        let (chunks_per_invocation, tokens_per_pass) =
            routing_tile(self.ctx.caps.variants.routing_chunks, tokens);
        let score_chunks = Kernel::new(Family::Routing, "score_chunks")
            .with("DTYPE", dtype_code(keys.dtype))
            .with("CHUNKS", chunks_per_invocation as u32)
            .with("TOKENS", tokens_per_pass as u32);
        for (buffer, window) in
            self.part_windows("routing keys", &keys.parts, row, keys.dtype.size_in_bytes())?
        {
            let chunks = window.rows.len();
            self.ctx.dispatch(
                &score_chunks,
                &params(chunks, window.rows.start, window.base, q_heads),
                &[
                    bind(1, &q.buffer),
                    bind(2, buffer).window(window.offset, window.size),
                    bind(3, &chunk_scores.buffer),
                ],
                chunks.div_ceil(LANES * chunks_per_invocation),
            )?;
        }
        let offsets = self.upload_u32(doc_chunk_offsets, "document chunk offsets")?;
        self.ctx.dispatch(
            &Kernel::new(Family::Routing, "score_documents"),
            &params(dims.chunks, 0, 0, q_heads),
            &[
                bind(4, &chunk_scores.buffer),
                bind(5, &offsets),
                bind(6, &doc_scores.buffer),
            ],
            dims.documents.div_ceil(LANES),
        )?;
        Ok(doc_scores)
    }
}

/// Whether rows of `row_elements` elements of `dtype`, the first at element `base` of a binding,
/// all start on a 16-byte word, so that kernels may read them as vec4s.
fn on_words(dtype: DType, row_elements: usize, base: u32) -> bool {
    let per_word = 16 / dtype.size_in_bytes();
    row_elements.is_multiple_of(per_word) && (base as usize).is_multiple_of(per_word)
}

/// Chunks per invocation and query tokens per pass of the routing scan (`CHUNKS`, `TOKENS` in
/// routing.wgsl): the adapter's chunks, up to 4 tokens per pass (lavapipe, 16-token query over 1M
/// memory tokens: 8 chunks × 4 tokens 34–39 ms against 58 ms with 4 × 4).
fn routing_tile(routing_chunks: u32, tokens: usize) -> (usize, usize) {
    (routing_chunks as usize, tokens.next_power_of_two().min(4))
}

/// Which row norm (see norm.wgsl).
#[derive(Clone, Copy)]
enum Norm<'a> {
    Rms(&'a WgpuWeight),
    L2,
    /// RMSNorm per head, then RoPE with the cos/sin `table` of the rows' positions.
    RmsRope {
        weight: &'a WgpuWeight,
        table: &'a wgpu::Buffer,
        heads: usize,
    },
}

/// What a projection fuses around `x · Wᵀ` (see matmul.wgsl).
#[derive(Clone, Copy)]
enum Fusion<'a> {
    None,
    /// `residual + x · Wᵀ`.
    Add(&'a WgpuTensor),
    /// `rms_norm(x, norm, eps) · Wᵀ`.
    Norm {
        norm: &'a WgpuWeight,
        eps: f32,
    },
    /// `silu(n · Wᵀ) ⊙ (n · upᵀ)`, `n = rms_norm(x, norm, eps)`.
    NormSwiglu {
        norm: &'a WgpuWeight,
        eps: f32,
        up: &'a WgpuWeight,
    },
}

impl WgpuBackend {
    /// `x · Wᵀ` with `fusion`, binding the weight (and `up`) window by window.
    fn projection(
        &self,
        x: &WgpuTensor,
        weight: &WgpuWeight,
        fusion: Fusion<'_>,
    ) -> Result<WgpuTensor> {
        let (n, inner, out_features) = shapes::matmul_dims(&x.shape, &weight.shape)?;
        self.fits(&[x], "matmul")?;
        let out = self.tensor(n * out_features, vec![n, out_features], "matmul")?;
        self.fits(&[&out], "matmul")?;
        if let Fusion::Add(residual) = fusion {
            shapes::same_shape("matmul_add", &residual.shape, &out.shape)?;
        }
        if n == 0 {
            return Ok(out);
        }
        // For a single token (a GEMV) the adapter's decode columns per tile (one on GPUs: as many
        // tiles as columns); for a block 8 columns × 4 rows where one invocation takes a tile (its
        // registers carry all the reuse: lavapipe's 128-row gate_proj 360 ms against 481 ms with
        // 4 × 4 and 572 ms with 4 × 2), 4 × 2 where `split` invocations share it (their partial sums
        // fit workgroup memory for 4 columns).
        let variants = self.ctx.caps.variants;
        let split = variants.matmul_split as usize;
        let (col_tile, row_tile) = if n == 1 {
            (variants.decode_columns as usize, 1)
        } else if split == 1 {
            (8, 4)
        } else {
            (4, 2)
        };
        let (prologue, epilogue, eps) = match fusion {
            Fusion::None => (0, 0, 0.0),
            Fusion::Add(_) => (0, 1, 0.0),
            Fusion::Norm { eps, .. } => (1, 0, eps),
            Fusion::NormSwiglu { eps, .. } => (1, 2, eps),
        };
        let windows = self.part_windows(
            "matmul weight",
            &weight.parts,
            inner,
            weight.dtype.size_in_bytes(),
        )?;
        // `up` is split like the weight (checked by the caller), so its windows are the same.
        let up_windows = match fusion {
            Fusion::NormSwiglu { up, .. } => Some(self.part_windows(
                "matmul weight",
                &up.parts,
                inner,
                up.dtype.size_in_bytes(),
            )?),
            _ => None,
        };
        // Bindings a specialisation leaves unused take the placeholder.
        let placeholder = &self.ctx.placeholder;
        let residual = match fusion {
            Fusion::Add(residual) => &residual.buffer,
            _ => placeholder,
        };
        let norm = match fusion {
            Fusion::Norm { norm, .. } | Fusion::NormSwiglu { norm, .. } => norm.whole(),
            _ => placeholder,
        };
        for (i, (buffer, window)) in windows.iter().enumerate() {
            let cols = window.rows.len();
            let on_words = on_words(weight.dtype, inner, window.base);
            // Blocks of rows take the workgroup-tiled GEMM where the adapter's table says so and
            // the shape allows it (see matmul.wgsl); under half a tile of rows would waste most of
            // each block.
            let tiled = variants.matmul_tiles
                && n >= MATMUL_TILE / 2
                && on_words
                && inner.is_multiple_of(MATMUL_TILE);
            let (kernel, col_tile, row_tile) = if tiled {
                let kernel = Kernel::new(Family::Matmul, "matmul_tiled");
                (kernel, MATMUL_TILE, MATMUL_TILE)
            } else {
                let kernel = Kernel::new(Family::Matmul, "matmul")
                    .with("ROWS", row_tile as u32)
                    .with("COLS", col_tile as u32)
                    .with("SPLIT", split as u32);
                (kernel, col_tile, row_tile)
            };
            let kernel = kernel
                .with("DTYPE", dtype_code(weight.dtype))
                .with("NORM", prologue)
                .with("EPILOGUE", epilogue);
            let (col_blocks, row_blocks) = (cols.div_ceil(col_tile), n.div_ceil(row_tile));
            // A tiled block is one workgroup; otherwise `split` invocations take each tile.
            let invocations_per_block = if tiled { LANES } else { split };
            let workgroups = (col_blocks * row_blocks * invocations_per_block).div_ceil(LANES);
            let params = [
                n as u32,
                inner as u32,
                cols as u32,
                window.rows.start as u32,
                out_features as u32,
                window.base,
                row_blocks as u32,
                eps.to_bits(),
                col_blocks as u32,
                // Every weight row starts on a 16-byte word (and so does `up`'s, split alike).
                u32::from(on_words),
            ];
            let weight_window = bind(2, buffer).window(window.offset, window.size);
            let up = match &up_windows {
                Some(up_windows) => {
                    let (up_buffer, up_window) = &up_windows[i];
                    bind(5, up_buffer).window(up_window.offset, up_window.size)
                }
                None => bind(5, placeholder),
            };
            self.ctx.dispatch(
                &kernel,
                &params,
                &[
                    bind(1, &x.buffer),
                    weight_window,
                    bind(3, &out.buffer),
                    bind(4, residual),
                    up,
                    bind(6, norm),
                ],
                workgroups,
            )?;
        }
        Ok(out)
    }
}

impl Backend for WgpuBackend {
    type Tensor = WgpuTensor;
    type Weight = WgpuWeight;

    fn describe(&self) -> String {
        let info = &self.ctx.info;
        format!(
            "wgpu: {} ({:?}, {:?}, {} {})",
            info.name, info.backend, info.device_type, info.driver, info.driver_info
        )
    }

    fn max_tensor_bytes(&self) -> Option<u64> {
        // Activations are bound whole; a binding is never larger than a buffer.
        Some(self.ctx.caps.max_binding_bytes)
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<WgpuTensor> {
        shapes::check_fill("upload", data.len(), &[data.len()], shape)?;
        Ok(WgpuTensor {
            buffer: counted(
                self.ctx
                    .storage_with(bytemuck::cast_slice(data), "tensor")?,
            ),
            shape: shape.to_vec(),
        })
    }

    fn upload_weight(&self, view: TensorView<'_>) -> Result<WgpuWeight> {
        shapes::check_weight_bytes(&view)?;
        let caps = &self.ctx.caps;
        // Kernels bind a weight whole when it fits one binding, otherwise rows in windows that start
        // up to one alignment early (a 1-D weight is one row).
        let rows = if view.shape.len() >= 2 {
            view.shape[0]
        } else {
            1
        };
        let total = view.bytes.len();
        let row_bytes = total / rows.max(1);
        let largest_row = caps
            .max_binding_bytes
            .saturating_sub(u64::from(caps.storage_offset_alignment));
        if total as u64 > caps.max_binding_bytes && row_bytes as u64 > largest_row {
            return Err(self.ctx.limit_error(format!(
                "the model exceeds this device's buffer limits: a row of `{}` {:?} is {row_bytes} \
                 bytes, more than the {largest_row} bytes a storage binding \
                 (maxStorageBufferBindingSize {}) can hold",
                view.name, view.shape, caps.max_binding_bytes
            )));
        }
        // Larger than a buffer: as many whole rows per part as fit (each part its own buffer).
        let rows_per_part = if total as u64 <= caps.max_buffer_bytes {
            rows.max(1)
        } else {
            (caps.max_buffer_bytes / row_bytes as u64) as usize
        };
        if rows_per_part == 0 {
            return Err(self.ctx.limit_error(format!(
                "the model exceeds this device's buffer limits: a row of `{}` {:?} is {row_bytes} \
                 bytes, more than the largest buffer (maxBufferSize {})",
                view.name, view.shape, caps.max_buffer_bytes
            )));
        }
        let parts = (0..rows.max(1))
            .step_by(rows_per_part)
            .map(|first| {
                let end = (first + rows_per_part).min(rows);
                Ok(Part {
                    buffer: self
                        .ctx
                        .storage_with(&view.bytes[first * row_bytes..end * row_bytes], view.name)?,
                    rows: first..end,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(WgpuWeight {
            parts,
            shape: view.shape.to_vec(),
            dtype: view.dtype,
        })
    }

    fn tensor_to_weight(&self, tensor: &WgpuTensor) -> Result<WgpuWeight> {
        // Buffers are reference counted: the weight shares the tensor's storage.
        Ok(WgpuWeight {
            parts: vec![tensor.whole()],
            shape: tensor.shape.clone(),
            dtype: DType::F32,
        })
    }

    fn read(&self, tensor: &WgpuTensor) -> impl Future<Output = Result<Vec<f32>>> {
        let bytes = self.ctx.read_bytes(&tensor.buffer, tensor.bytes());
        async move { Ok(bytemuck::pod_collect_to_vec(&bytes.await?)) }
    }

    fn synchronize(&self) -> impl Future<Output = Result<()>> {
        // Reading back a few bytes submits everything recorded and waits for the device to finish it.
        let empty = self.ctx.storage(4, "synchronize");
        let done = empty.map(|buffer| self.ctx.read_bytes(&buffer, 4));
        async move {
            done?.await?;
            Ok(())
        }
    }

    fn flush(&self) {
        self.ctx.submit();
    }

    fn shape(&self, tensor: &WgpuTensor) -> Vec<usize> {
        tensor.shape.clone()
    }

    fn reshape(&self, tensor: &WgpuTensor, shape: &[usize]) -> Result<WgpuTensor> {
        shapes::check_fill("reshape", tensor.len(), &tensor.shape, shape)?;
        Ok(WgpuTensor {
            buffer: tensor.buffer.clone(),
            shape: shape.to_vec(),
        })
    }

    fn embedding(&self, table: &WgpuWeight, ids: &[u32]) -> Result<WgpuTensor> {
        let (_, hidden) = shapes::embedding_dims(&table.shape, ids)?;
        self.gather(
            &table.parts,
            table.dtype,
            hidden,
            ids,
            vec![ids.len(), hidden],
        )
    }

    fn matmul(&self, x: &WgpuTensor, weight: &WgpuWeight) -> Result<WgpuTensor> {
        self.projection(x, weight, Fusion::None)
    }

    fn norm_matmul(
        &self,
        x: &WgpuTensor,
        norm: &WgpuWeight,
        eps: f32,
        weight: &WgpuWeight,
    ) -> Result<WgpuTensor> {
        // The fused norm runs over the whole row: only a [rows, width] input has the norm's width.
        if norm.dtype != weight.dtype || x.shape.len() != 2 {
            return self.matmul(&self.rms_norm(x, norm, eps)?, weight);
        }
        shapes::rms_norm_width(&x.shape, &norm.shape)?;
        self.projection(x, weight, Fusion::Norm { norm, eps })
    }

    fn norm_rope(
        &self,
        x: &WgpuTensor,
        weight: &WgpuWeight,
        eps: f32,
        positions: &[u32],
        theta: f64,
    ) -> Result<WgpuTensor> {
        let width = shapes::rms_norm_width(&x.shape, &weight.shape)?;
        let (_, heads, d) = shapes::rope_dims(&x.shape, positions.len())?;
        debug_assert_eq!(width, d);
        let table = self.rope_buffer(positions, theta, d)?;
        self.norm(
            x,
            width,
            Norm::RmsRope {
                weight,
                table: &table,
                heads,
            },
            eps,
        )
    }

    fn matmul_add(
        &self,
        x: &WgpuTensor,
        weight: &WgpuWeight,
        residual: &WgpuTensor,
    ) -> Result<WgpuTensor> {
        self.projection(x, weight, Fusion::Add(residual))
    }

    fn norm_swiglu(
        &self,
        x: &WgpuTensor,
        norm: &WgpuWeight,
        eps: f32,
        gate: &WgpuWeight,
        up: &WgpuWeight,
    ) -> Result<WgpuTensor> {
        // One pass needs the three weights packed alike (the kernel has one DTYPE) and split alike, and
        // a [rows, width] input: the fused norm runs over the whole row.
        let fusable = norm.dtype == gate.dtype
            && up.dtype == gate.dtype
            && up.shape == gate.shape
            && x.shape.len() == 2
            && up
                .parts
                .iter()
                .map(|p| &p.rows)
                .eq(gate.parts.iter().map(|p| &p.rows));
        if !fusable {
            let normed = self.rms_norm(x, norm, eps)?;
            return self.silu_mul(&self.matmul(&normed, gate)?, &self.matmul(&normed, up)?);
        }
        shapes::rms_norm_width(&x.shape, &norm.shape)?;
        self.projection(x, gate, Fusion::NormSwiglu { norm, eps, up })
    }

    fn rms_norm(&self, x: &WgpuTensor, weight: &WgpuWeight, eps: f32) -> Result<WgpuTensor> {
        let width = shapes::rms_norm_width(&x.shape, &weight.shape)?;
        self.norm(x, width, Norm::Rms(weight), eps)
    }

    fn rope(&self, x: &WgpuTensor, positions: &[u32], theta: f64) -> Result<WgpuTensor> {
        let (n, heads, d) = shapes::rope_dims(&x.shape, positions.len())?;
        self.fits(&[x], "rope")?;
        let table = self.rope_buffer(positions, theta, d)?;
        let out = self.tensor(x.len(), x.shape.clone(), "rope")?;
        let pairs = n * heads * d / 2;
        self.ctx.dispatch(
            &Kernel::new(Family::Rope, "rope"),
            &[pairs as u32, heads as u32, (d / 2) as u32],
            &[bind(1, &x.buffer), bind(2, &table), bind(3, &out.buffer)],
            pairs.div_ceil(LANES),
        )?;
        Ok(out)
    }

    fn attention(
        &self,
        q: &WgpuTensor,
        k: &WgpuTensor,
        v: &WgpuTensor,
        mask: AttentionMask<'_>,
    ) -> Result<WgpuTensor> {
        let AttentionDims {
            nq,
            heads,
            d,
            nk,
            kv_heads,
        } = shapes::attention_dims(&q.shape, &k.shape, &v.shape)?;
        shapes::attention_mask(&mask, nq, nk)?;
        if d > MAX_HEAD_DIM {
            return Err(Error::shape(
                "attention",
                format!("head dim {d} exceeds the kernel's {MAX_HEAD_DIM}"),
            ));
        }
        self.fits(&[q, k, v], "attention")?;
        let out = self.tensor(nq * heads * d, vec![nq, heads, d], "attention")?;
        if nq == 0 || heads == 0 {
            return Ok(out);
        }
        // A workgroup takes the largest power of two of query heads (up to 4) that divides a KV
        // head's group, reading each key and value once for all of them.
        let group = 1
            << (heads / kv_heads)
                .trailing_zeros()
                .min(MAX_ATTENTION_GROUP.ilog2());
        let head_groups = heads / group;
        let variants = self.ctx.caps.variants;
        // A tile is the keys one pass of the workgroup scores; splits are whole tiles.
        let tile = LANES * variants.attention_keys as usize;
        // Split the keys when rows × head groups alone leave the device idle (decode).
        let splits = ATTENTION_WORKGROUPS
            .div_ceil(nq * head_groups)
            .clamp(1, MAX_SPLITS)
            .min(nk.div_ceil(tile));
        let split_len = nk.div_ceil(splits).next_multiple_of(tile);
        let splits = nk.div_ceil(split_len);
        let params = [
            nq as u32,
            nk as u32,
            heads as u32,
            kv_heads as u32,
            d as u32,
            u32::from(mask != AttentionMask::Full),
            splits as u32,
            split_len as u32,
            (1.0 / (d as f32).sqrt()).to_bits(),
            u32::from(matches!(mask, AttentionMask::Packed(_))),
        ];
        // Packed: each row's first visible key (its sequence's start); otherwise an unused placeholder.
        let row_first = match mask {
            AttentionMask::Packed(_) => {
                let first: Vec<u32> = (0..nq)
                    .map(|i| mask.visible_keys(i, nq, nk).start as u32)
                    .collect();
                self.upload_u32(&first, "attention row starts")?
            }
            _ => self.ctx.placeholder.clone(),
        };
        let workgroups = nq * head_groups * splits;
        let partials = nq * heads * splits;
        // One split writes the output directly (its `stats` binding unused: any small buffer); several
        // write partial accumulators and (m, l) for `combine`.
        let (target, stats) = if splits == 1 {
            (
                (*out.buffer).clone(),
                self.ctx.storage(8, "attention stats (unused)")?,
            )
        } else {
            (
                self.ctx
                    .storage((partials * d * 4) as u64, "attention partial")?,
                self.ctx.storage((partials * 8) as u64, "attention stats")?,
            )
        };
        self.ctx.dispatch(
            &Kernel::new(Family::Attention, "attend")
                .with("GROUP", group as u32)
                .with("KEYS", variants.attention_keys)
                .with("WORDS", variants.attention_words)
                .with("VECTORS", u32::from(d % 4 == 0)),
            &params,
            &[
                bind(1, &q.buffer),
                bind(2, &k.buffer),
                bind(3, &v.buffer),
                bind(4, &target),
                bind(5, &stats),
                bind(9, &row_first),
            ],
            workgroups,
        )?;
        if splits == 1 {
            return Ok(out);
        }
        self.ctx.dispatch(
            &Kernel::new(Family::Attention, "combine"),
            &params,
            &[bind(6, &target), bind(7, &stats), bind(8, &out.buffer)],
            (nq * heads * d).div_ceil(LANES),
        )?;
        Ok(out)
    }

    fn silu_mul(&self, gate: &WgpuTensor, up: &WgpuTensor) -> Result<WgpuTensor> {
        self.elementwise(1, gate, up, "silu_mul")
    }

    fn add(&self, a: &WgpuTensor, b: &WgpuTensor) -> Result<WgpuTensor> {
        self.elementwise(0, a, b, "add")
    }

    fn concat_rows(&self, parts: &[&WgpuTensor]) -> Result<WgpuTensor> {
        let part_shapes: Vec<&[usize]> = parts.iter().map(|p| &p.shape[..]).collect();
        let shape = shapes::concat_shape(&part_shapes)?;
        let out = self.tensor(shape.iter().product(), shape, "concat")?;
        let mut offset = 0;
        for part in parts {
            self.ctx
                .copy(&part.buffer, 0, &out.buffer, offset, part.bytes());
            offset += part.bytes();
        }
        Ok(out)
    }

    fn append_rows(&self, held: WgpuTensor, parts: &[&WgpuTensor]) -> Result<WgpuTensor> {
        let part_shapes: Vec<&[usize]> = parts.iter().map(|p| &p.shape[..]).collect();
        let shape = shapes::append_shape(&held.shape, &part_shapes)?;
        let (rows, width) = shapes::rows_and_width(&shape);
        let bytes = (rows * width * 4) as u64;
        let mut offset = held.bytes();
        // A buffer only this tensor holds takes the parts in its rows past `held`'s when it has
        // room (the commands recorded on it read only `held`'s rows); otherwise `held` is copied to
        // a new one with room for more, as long as that room keeps it within one binding.
        let buffer = if Arc::strong_count(&held.buffer) == 1 && held.buffer.size() >= bytes {
            held.buffer
        } else {
            let grown = (shapes::grown_rows(rows) * width * 4) as u64;
            let capacity = grown.min(self.ctx.caps.max_binding_bytes.max(bytes));
            let buffer = self.ctx.storage(capacity, "context")?;
            self.ctx.copy(&held.buffer, 0, &buffer, 0, offset);
            counted(buffer)
        };
        for part in parts {
            self.ctx
                .copy(&part.buffer, 0, &buffer, offset, part.bytes());
            offset += part.bytes();
        }
        Ok(WgpuTensor { buffer, shape })
    }

    fn rows(&self, tensor: &WgpuTensor, range: Range<usize>) -> Result<WgpuTensor> {
        let shape = shapes::rows_shape(&tensor.shape, &range)?;
        let (_, width) = shapes::rows_and_width(&tensor.shape);
        let out = self.tensor(shape.iter().product(), shape, "rows")?;
        let row_bytes = (width * 4) as u64;
        self.ctx.copy(
            &tensor.buffer,
            range.start as u64 * row_bytes,
            &out.buffer,
            0,
            out.bytes(),
        );
        Ok(out)
    }

    fn gather_rows(&self, tensor: &WgpuTensor, indices: &[u32]) -> Result<WgpuTensor> {
        let shape = shapes::gather_shape(&tensor.shape, indices)?;
        let (_, width) = shapes::rows_and_width(&tensor.shape);
        self.gather(&[tensor.whole()], DType::F32, width, indices, shape)
    }

    fn chunk_mean_pool(&self, x: &WgpuTensor, chunk: usize) -> Result<WgpuTensor> {
        let shape = shapes::pool_shape(&x.shape, chunk)?;
        self.fits(&[x], "chunk_mean_pool")?;
        let (rows, width) = shapes::rows_and_width(&x.shape);
        let elements: usize = shape.iter().product();
        let out = self.tensor(elements, shape, "pool")?;
        self.ctx.dispatch(
            &Kernel::new(Family::Pool, "pool"),
            &[elements as u32, rows as u32, width as u32, chunk as u32],
            &[bind(1, &x.buffer), bind(2, &out.buffer)],
            elements.div_ceil(LANES),
        )?;
        Ok(out)
    }

    fn l2_normalize(&self, x: &WgpuTensor) -> Result<WgpuTensor> {
        let width = shapes::norm_width("l2_normalize", &x.shape)?;
        self.norm(x, width, Norm::L2, 0.0)
    }

    fn routing_scores(
        &self,
        queries: &WgpuTensor,
        routing_rows: &[u32],
        keys: &WgpuWeight,
        doc_chunk_offsets: &[u32],
        spec: RoutingSpec,
    ) -> Result<WgpuTensor> {
        let dims =
            shapes::routing_dims(&queries.shape, routing_rows, &keys.shape, doc_chunk_offsets)?;
        // "Last" is "max" over the last routing row alone.
        let (rows, spec) = match spec.query_reduce {
            QueryReduce::Last => (
                &routing_rows[routing_rows.len() - 1..],
                RoutingSpec {
                    query_reduce: QueryReduce::Max,
                    ..spec
                },
            ),
            _ => (routing_rows, spec),
        };
        let q = self.gather_rows(queries, rows)?;
        let (q, scale) = match spec.score_mode {
            ScoreMode::Cosine => {
                let per_head = self.reshape(&q, &[rows.len() * dims.heads, dims.d])?;
                (self.l2_normalize(&per_head)?, 1.0)
            }
            ScoreMode::ScaledDot => (q, 1.0 / (dims.d as f32).sqrt()),
        };
        let q = self.reshape(&q, &[rows.len(), dims.heads, dims.d])?;
        self.score(&q, keys, doc_chunk_offsets, dims, spec, scale)
    }

    fn top_k(&self, scores: &WgpuTensor, k: usize) -> impl Future<Output = Result<Vec<Scored>>> {
        let recorded = self.record_top_k(scores, k);
        async move {
            let (on_device, k, bytes) = recorded?;
            let bytes = bytes.await?;
            if !on_device {
                return Ok(select_top_k(
                    &bytemuck::pod_collect_to_vec::<u8, f32>(&bytes),
                    k,
                ));
            }
            Ok(Scored::from_device_pairs(&bytemuck::pod_collect_to_vec(
                &bytes,
            )))
        }
    }
}

impl WgpuBackend {
    /// Records a top-k and its readback: `(on_device, k, bytes)`. On the device the bytes are k
    /// (raw score, index) pairs; past [`MAX_DEVICE_K`] they are every score, for the host to select.
    fn record_top_k(
        &self,
        scores: &WgpuTensor,
        k: usize,
    ) -> Result<(bool, usize, impl Future<Output = Result<Vec<u8>>> + use<>)> {
        shapes::check_scores(&scores.shape)?;
        let n = scores.len();
        let k = k.min(n);
        if k > MAX_DEVICE_K {
            return Ok((
                false,
                k,
                self.ctx.read_bytes(&scores.buffer, scores.bytes()),
            ));
        }
        self.fits(&[scores], "top_k")?;
        let kernel = Kernel::new(Family::TopK, "select_top_k");
        let mut count = n;
        let mut pairs = false;
        let mut src = (*scores.buffer).clone();
        loop {
            let blocks = count.div_ceil(TOP_K_BLOCK).max(1);
            let dst = self
                .ctx
                .storage((blocks * k * 8) as u64, "top-k candidates")?;
            if k > 0 {
                self.ctx.dispatch(
                    &kernel,
                    &[count as u32, k as u32, u32::from(pairs), blocks as u32],
                    &[bind(1, &src), bind(2, &dst)],
                    blocks,
                )?;
            }
            if blocks == 1 {
                return Ok((true, k, self.ctx.read_bytes(&dst, (k * 8) as u64)));
            }
            src = dst;
            count = blocks * k;
            pairs = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::misplaced_lane;

    /// (lane, size, run sum, 0) of 64 invocations whose subgroup lane is `lane_of(index)` and whose
    /// runs of `width` sum as consecutive indices do.
    fn layout(size: u32, width: u32, lane_of: impl Fn(u32) -> u32) -> Vec<u32> {
        (0..64)
            .flat_map(|i| {
                let first = i / width * width;
                [lane_of(i), size, (first..first + width).sum(), 0]
            })
            .collect()
    }

    #[test]
    fn the_subgroup_layout_check_accepts_aligned_runs_only() {
        // Consecutive runs, as every known driver lays them out, of the width or wider.
        assert_eq!(misplaced_lane(&layout(8, 8, |i| i % 8), 8), None);
        assert_eq!(misplaced_lane(&layout(32, 8, |i| i % 32), 8), None);
        // Interleaved subgroups (invocation i in subgroup i % 8), a smaller size than the width, a
        // size that is no power of two.
        assert_eq!(
            misplaced_lane(&layout(8, 8, |i| i / 8), 8),
            Some((1, 0, 8, 28))
        );
        assert_eq!(
            misplaced_lane(&layout(4, 8, |i| i % 4), 8),
            Some((0, 0, 4, 28))
        );
        assert_eq!(
            misplaced_lane(&layout(12, 8, |i| i % 12), 8),
            Some((0, 0, 12, 28))
        );
        // The right layout, but an exchange that sums something else.
        let mut wrong_sum = layout(8, 8, |i| i % 8);
        wrong_sum[4 * 9 + 2] += 1;
        assert_eq!(misplaced_lane(&wrong_sum, 8), Some((9, 1, 8, 93)));
    }
}
