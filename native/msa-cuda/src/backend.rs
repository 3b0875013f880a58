//! [`Backend`] on CUDA: every op queued on the device's stream; reads wait for it.

use std::future::{Future, ready};
use std::ops::Range;
use std::sync::Arc;

use bytemuck::Pod;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use msa_core::{ChunkReduce, DType, HeadReduce, QueryReduce, ScoreMode, TensorView};
use msa_engine::backend::PieceWriter;
use msa_engine::{
    AttentionMask, Backend, DeviceLink, Error, Result, RopeTableCache, RoutingSpec, Scored,
    select_top_k, shapes,
};

use crate::clique::Member;
use crate::counts::{ExecutionCounts, KernelTimes};
use crate::device::{
    ATTENTION_WARPS, CudaOptions, Device, MAX_PER_LANE, ROUTING_MMA_WARPS, Readback, SMALL_ROWS,
    STAGED_MAX, TOP_K_ITEMS, TOP_K_THREADS, WARP, grid_for_threads, grid_for_warps, guarded,
};

/// The widest head vector the warp-per-head kernels hold in registers.
const MAX_HEAD_DIM: usize = WARP as usize * MAX_PER_LANE;
/// Routing queries with fewer rows per KV head (tokens × query heads per KV head, 1 per token for a
/// head mean) are scanned rather than multiplied on tensor cores.
const ROUTING_GEMM_MIN_ROWS: usize = 4;
/// Keys per split of split-KV attention, at least on average over the longest query's keys: its 8
/// warps get several keys each.
const MIN_SPLIT_KEYS: usize = 256;
/// Chunks scored per routing GEMM: bounds the temporary dot products (MSA-4B, 16 routing tokens: for a
/// head mean 2 × 16 rows × 65,536 × 4 B = 8 MB; a head max has 8 KV heads × 2 × 64 rows, 256 MB).
const ROUTING_TILE_CHUNKS: usize = 1 << 16;
/// Top k up to this k is selected on the device (each round keeps at most k per 4,096 candidates);
/// beyond it, on the host from every score.
pub(crate) const MAX_DEVICE_K: usize = 256;

/// The CUDA backend. Cheap to clone: clones share the device.
#[derive(Clone)]
pub struct CudaBackend {
    pub(crate) device: Arc<Device>,
    rope: Arc<RopeTableCache<CudaTensor>>,
    /// Its NCCL clique, once joined ([`CudaBackend::join_clique`]).
    pub(crate) member: Option<Member>,
}

/// An f32 tensor in device memory. Clones and reshapes share the allocation.
#[derive(Clone)]
pub struct CudaTensor {
    pub(crate) data: Arc<CudaSlice<f32>>,
    pub(crate) shape: Vec<usize>,
}

impl CudaTensor {
    pub(crate) fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A weight in device memory in its stored dtype.
pub struct CudaWeight {
    data: WeightData,
    dtype: DType,
    shape: Vec<usize>,
}

enum WeightData {
    F32(Arc<CudaSlice<f32>>),
    /// bf16 or f16 bits.
    Half(CudaSlice<u16>),
}

/// The suffix of a kernel instantiated for a weight dtype.
fn kernel_suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
    }
}

impl CudaWeight {
    fn suffix(&self) -> &'static str {
        kernel_suffix(self.dtype)
    }
}

/// A top k on its way: selected already, or its pairs landing in page-locked memory.
enum QueuedTopK {
    Selected(Vec<Scored>),
    Landing {
        pairs: Readback,
        device: Arc<Device>,
    },
}

/// The shape of a routing product against half-precision keys, and how it reduces (see
/// [`CudaBackend::routing_gemm`] and [`CudaBackend::routing_mma`], which reads no `per_kv` or `batch`:
/// a head mean has one of each).
struct RoutingGemm {
    chunks: usize,
    tokens: usize,
    /// Query rows per token in each GEMM of the batch: 1 for a head mean, the query heads per KV head
    /// for a head max.
    per_kv: usize,
    /// GEMMs batched: one per KV head for a head max; one over whole key rows for a head mean.
    batch: usize,
    /// Elements per dot product: the head dimension, or a chunk's whole key row for a head mean.
    width: usize,
    /// Elements per chunk of keys (KV heads × head dimension).
    key_row: usize,
    head_mean: u32,
    head_divisor: f32,
    query_reduce: u32,
}

/// What a small projection fuses around `x · Wᵀ` (see `matmul_small` in kernels.cu).
enum SmallFusion<'a> {
    None,
    /// `residual + x · Wᵀ`.
    Residual(&'a CudaTensor),
    /// `rms_norm(x, norm, eps) · Wᵀ`.
    Norm {
        norm: &'a CudaWeight,
        eps: f32,
    },
    /// `silu(n · Wᵀ) ⊙ (n · Uᵀ)`, `n = rms_norm(x, norm, eps)`.
    NormSwiglu {
        norm: &'a CudaWeight,
        eps: f32,
        up: &'a CudaWeight,
    },
}

/// A kernel's launch being built, with the kernel's name (counted and timed by it).
struct KernelArgs<'a> {
    args: LaunchArgs<'a>,
    kernel: &'static str,
}

impl<'a> std::ops::Deref for KernelArgs<'a> {
    type Target = LaunchArgs<'a>;
    fn deref(&self) -> &LaunchArgs<'a> {
        &self.args
    }
}

impl<'a> std::ops::DerefMut for KernelArgs<'a> {
    fn deref_mut(&mut self) -> &mut LaunchArgs<'a> {
        &mut self.args
    }
}

/// Pushes a weight of any dtype as a kernel argument.
fn weight_arg<'a>(args: &mut LaunchArgs<'a>, weight: &'a WeightData) {
    match weight {
        WeightData::F32(data) => args.arg(data.as_ref()),
        WeightData::Half(data) => args.arg(data),
    };
}

impl CudaBackend {
    /// Opens a CUDA device: loads the driver, NVRTC and cuBLAS, and compiles the kernels (once per
    /// process). A missing library or device is an error naming what to install.
    pub fn new(options: CudaOptions) -> Result<Self> {
        let backend = CudaBackend {
            device: Arc::new(Device::open(&options)?),
            rope: Arc::default(),
            member: None,
        };
        guarded(|| backend.warm_up())??;
        Ok(backend)
    }

    /// The CUDA device ordinal it runs on (0 = the first GPU, in the CUDA driver's
    /// order: `nvidia-smi`'s where `CUDA_DEVICE_ORDER=PCI_BUS_ID`).
    pub fn ordinal(&self) -> usize {
        self.device.stream.context().ordinal()
    }

    /// The kernels launched, the copies between device allocations and the host's waits for the
    /// device since it opened (shared by its clones): the difference of two readings counts the
    /// work between them.
    pub fn execution_counts(&self) -> ExecutionCounts {
        self.device.counters.read()
    }

    /// Each kernel's launches and device time so far, once every launch queued has run, where
    /// [`CudaOptions::time_kernels`] asked for them (`None` otherwise). A cuBLAS call counts as one
    /// kernel, named after the call, and copies between device allocations as one named
    /// [`COPY_KERNEL`](crate::COPY_KERNEL).
    pub fn kernel_times(&self) -> Result<Option<KernelTimes>> {
        self.device.kernel_times()
    }

    /// Runs each cuBLAS path once on tiny inputs (the f32 and bf16 GEMMs, the routing GEMM): cudarc
    /// looks a library's functions up on first use and panics on a missing one, so a library without
    /// one fails here, as an error, rather than in the middle of a model.
    fn warm_up(&self) -> Result<()> {
        let weight = |dtype: DType, shape: &[usize]| {
            let bytes = vec![0u8; shape.iter().product::<usize>() * dtype.size_in_bytes()];
            self.upload_weight(TensorView {
                name: "warm-up",
                dtype,
                shape,
                bytes: &bytes,
            })
        };
        let rows = SMALL_ROWS + 1;
        let x = self.upload(&vec![1.0; rows * 2], &[rows, 2])?;
        for dtype in [DType::F32, DType::BF16] {
            self.matmul(&x, &weight(dtype, &[1, 2])?)?;
        }
        let tokens = ROUTING_GEMM_MIN_ROWS;
        let queries = self.upload(&vec![1.0; tokens * 2], &[tokens, 1, 2])?;
        let spec = RoutingSpec {
            score_mode: ScoreMode::ScaledDot,
            head_reduce: HeadReduce::Mean,
            query_reduce: QueryReduce::Max,
            chunk_reduce: ChunkReduce::Max,
        };
        let rows: Vec<u32> = (0..tokens as u32).collect();
        let keys = weight(DType::BF16, &[1, 1, 2])?;
        self.read_now(&self.routing_scores(&queries, &rows, &keys, &[0, 1], spec)?)?;
        Ok(())
    }

    /// Opens the device, or returns `None` (printing why) when this machine has no usable CUDA device,
    /// so GPU tests skip on machines without one. With `MSA_REQUIRE_CUDA` set, a missing device panics
    /// instead: a skipped test is not a passing one.
    pub fn open_or_skip(options: CudaOptions) -> Option<Self> {
        match CudaBackend::new(options) {
            Ok(gpu) => Some(gpu),
            Err(e) if std::env::var_os("MSA_REQUIRE_CUDA").is_some() => {
                panic!("MSA_REQUIRE_CUDA is set and no CUDA device opened: {e}")
            }
            Err(e) => {
                eprintln!("skipping the CUDA run: {e}");
                None
            }
        }
    }

    pub(crate) fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every op writes its whole output before anything reads it. Zero-length tensors
        // (an op over no rows) get one element, since an empty allocation is refused.
        unsafe { self.device.stream.alloc::<T>(len.max(1)) }.map_err(|e| self.device.error(e))
    }

    /// Storage for a context of `rows` rows of `width` that grows ([`Backend::append_rows`]): with
    /// room for an eighth more rows ([`shapes::grown_rows`]), or, where the device has no memory
    /// for that, for [`shapes::SPARE_ROWS`] more, or for none.
    fn alloc_context(&self, rows: usize, width: usize) -> Result<CudaSlice<f32>> {
        for with_room in [shapes::grown_rows(rows), rows + shapes::SPARE_ROWS] {
            match self.alloc(with_room * width) {
                Err(Error::OutOfDeviceMemory { .. }) => continue,
                allocated => return allocated,
            }
        }
        self.alloc(rows * width)
    }

    pub(crate) fn alloc_zeroed(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.device
            .stream
            .alloc_zeros::<f32>(len.max(1))
            .map_err(|e| self.device.error(e))
    }

    fn tensor(&self, shape: Vec<usize>) -> Result<(CudaSlice<f32>, Vec<usize>)> {
        Ok((self.alloc(shape.iter().product())?, shape))
    }

    pub(crate) fn wrap(data: CudaSlice<f32>, shape: Vec<usize>) -> CudaTensor {
        CudaTensor {
            data: Arc::new(data),
            shape,
        }
    }

    /// Copies host values to a new allocation (one zero element for none, as every allocation):
    /// up to [`STAGED_MAX`] bytes queued through the device's pinned ring, larger ones (most weights)
    /// straight from pageable memory (where the driver may wait for the stream first). Weights handed
    /// over in pieces (fetched pages) take [`CudaBackend::gathered`]'s copy stream instead.
    fn upload_slice<T: DeviceRepr + Pod + Default>(&self, values: &[T]) -> Result<CudaSlice<T>> {
        let none = [T::default()];
        let values = if values.is_empty() { &none[..] } else { values };
        let bytes: &[u8] = bytemuck::cast_slice(values);
        if bytes.len() > STAGED_MAX {
            return self
                .device
                .stream
                .clone_htod(values)
                .map_err(|e| self.device.error(e));
        }
        let mut dst = self.alloc::<T>(values.len())?;
        self.device.copy_staged(bytes, &mut dst)?;
        Ok(dst)
    }

    /// Uploads the bytes of a `dtype` weight of `shape` that `write` hands over in pieces (see
    /// [`Device::upload_gathered`]), refused by its length when they are more or fewer.
    fn gathered<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        write: &mut PieceWriter<'_, '_>,
    ) -> Result<CudaSlice<T>> {
        let total = shape.iter().product::<usize>() * dtype.size_in_bytes();
        let (data, written) = self.device.upload_gathered(total, write)?;
        shapes::check_weight_len(name, dtype, shape, written)?;
        Ok(data.expect("every byte was handed over"))
    }

    /// Copies little-endian elements to the device: straight from `bytes` when they are aligned for `T`
    /// (a mapped checkpoint, a page buffer), else through one aligned copy.
    fn upload_bytes<T: Pod + DeviceRepr + Default>(&self, bytes: &[u8]) -> Result<CudaSlice<T>> {
        match bytemuck::try_cast_slice(bytes) {
            Ok(values) => self.upload_slice(values),
            Err(_) => self.upload_slice(&bytemuck::pod_collect_to_vec::<u8, T>(bytes)),
        }
    }

    /// The launch builder of a kernel, on the device's stream.
    fn args(&self, kernel: &str) -> KernelArgs<'_> {
        let (name, function) = self.device.kernel(kernel);
        KernelArgs {
            args: self.device.stream.launch_builder(function),
            kernel: name,
        }
    }

    fn launch(&self, args: &mut KernelArgs<'_>, config: LaunchConfig) -> Result<()> {
        self.device.launch(args.kernel, || {
            // SAFETY: each caller passes the arguments its kernel declares, with buffers sized for
            // the grid.
            unsafe { args.args.launch(config) }
                .map(drop)
                .map_err(|e| self.device.error(e))
        })
    }

    /// Copies `len` elements of `src` from `from` into `dst` at `to`, on the stream.
    fn copy(
        &self,
        src: &CudaSlice<f32>,
        from: usize,
        dst: &mut CudaSlice<f32>,
        to: usize,
        len: usize,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let src = src.slice(from..from + len);
        let mut dst = dst.slice_mut(to..to + len);
        self.device.device_copy(len * 4, || {
            (self.device.stream)
                .memcpy_dtod(&src, &mut dst)
                .map_err(|e| self.device.error(e))
        })
    }

    /// `[rows, width]` rows of a table in any dtype, picked by `ids`.
    fn gather(
        &self,
        kernel: &str,
        table: &WeightData,
        ids: &[u32],
        width: usize,
        shape: Vec<usize>,
    ) -> Result<CudaTensor> {
        let (mut out, shape) = self.tensor(shape)?;
        let ids_device = self.upload_slice(ids)?;
        let total = (ids.len() * width) as u64;
        let width = width as u32;
        let mut args = self.args(kernel);
        weight_arg(&mut args, table);
        args.arg(&ids_device).arg(&mut out).arg(&total).arg(&width);
        self.launch(&mut args, grid_for_threads(total))?;
        Ok(Self::wrap(out, shape))
    }

    /// `y = x · Wᵀ` on cuBLAS: row-major `x [n, inner]` and `W [out, inner]` are column-major `xᵀ` and
    /// `Wᵀ`, so `yᵀ = op(Wᵀ)ᵀ·xᵀ` is one column-major GEMM with the weight transposed.
    fn gemm(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        y: &mut CudaSlice<f32>,
        (n, inner, out): (usize, usize, usize),
    ) -> Result<()> {
        let blas_error = |e: cudarc::cublas::result::CublasError| self.device.error(e);
        let (m, n_cols, k) = (out as i32, n as i32, inner as i32);
        match &weight.data {
            WeightData::F32(w) => {
                let config = GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m,
                    n: n_cols,
                    k,
                    alpha: 1.0f32,
                    lda: k,
                    ldb: k,
                    beta: 0.0f32,
                    ldc: m,
                };
                self.device.launch("cuBLAS sgemm", || {
                    // SAFETY: the dimensions above describe the three allocations exactly.
                    unsafe {
                        self.device
                            .blas
                            .gemm(config, w.as_ref(), x.data.as_ref(), y)
                    }
                    .map_err(blas_error)
                })
            }
            WeightData::Half(w) => {
                // Tensor cores take both operands in the weight's dtype: round the activations once.
                let (rounded, data_type) = self.to_half(&x.data, n * inner, weight.dtype, None)?;
                let stream = &self.device.stream;
                let (alpha, beta) = (1.0f32, 0.0f32);
                let (w_ptr, _w) = w.device_ptr(stream);
                let (x_ptr, _x) = rounded.device_ptr(stream);
                let (y_ptr, _y) = y.device_ptr_mut(stream);
                // SAFETY: as above; alpha and beta are f32 as CUBLAS_COMPUTE_32F requires.
                self.device.launch("cuBLAS GemmEx", || unsafe {
                    cudarc::cublas::result::gemm_ex(
                        *self.device.blas.handle(),
                        cublasOperation_t::CUBLAS_OP_T,
                        cublasOperation_t::CUBLAS_OP_N,
                        m,
                        n_cols,
                        k,
                        (&alpha as *const f32).cast(),
                        w_ptr as *const _,
                        data_type,
                        k,
                        x_ptr as *const _,
                        data_type,
                        k,
                        (&beta as *const f32).cast(),
                        y_ptr as *mut _,
                        cudaDataType::CUDA_R_32F,
                        m,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                    .map_err(blas_error)
                })
            }
        }
    }

    /// The first `len` elements of `x` in a half `dtype` (bf16 or f16), rounded, or `split` into hi and
    /// lo parts per `group` elements (see `split_half`); with cuBLAS's name for that dtype.
    fn to_half(
        &self,
        x: &CudaSlice<f32>,
        len: usize,
        dtype: DType,
        split: Option<usize>,
    ) -> Result<(CudaSlice<u16>, cudaDataType)> {
        let (f16, data_type) = match dtype {
            DType::BF16 => (0u32, cudaDataType::CUDA_R_16BF),
            DType::F16 => (1u32, cudaDataType::CUDA_R_16F),
            DType::F32 => unreachable!("only bf16 and f16 weights take half-precision operands"),
        };
        let total = len as u64;
        let mut out = self.alloc::<u16>(len * if split.is_some() { 2 } else { 1 })?;
        let mut args = self.args(if split.is_some() {
            "split_half"
        } else {
            "round_half"
        });
        args.arg(x).arg(&mut out).arg(&total);
        let group = split.map(|g| g as u64);
        if let Some(group) = &group {
            args.arg(group);
        }
        args.arg(&f16);
        self.launch(&mut args, grid_for_threads(total))?;
        Ok((out, data_type))
    }

    /// Chunk scores on tensor cores, for half-precision keys: the routing query `[rows = tokens ×
    /// per_kv, width]` times the keys of a tile of chunks, one strided-batched GEMM per tile, then one
    /// reduction per chunk. For a head max the batch runs over the KV heads g (the query grouped per
    /// g, whose keys sit `d` elements apart in each chunk row). For a head mean, a sum of per-group dot
    /// products, it is one GEMM over whole chunk rows: `kv_heads` times fewer dot products written and
    /// read back, and a deeper inner dimension for the tensor cores. The query enters as two
    /// half-precision parts (hi, then lo: 2 × rows rows), whose dot products the reduction adds: 16
    /// significant bits of query against exact keys, at the cost of a few more rows in a GEMM bound by
    /// reading the keys. Tiles bound the dot products held.
    fn routing_gemm(
        &self,
        query: &CudaSlice<f32>,
        keys: (&CudaSlice<u16>, DType),
        chunk_scores: &mut CudaSlice<f32>,
        dims: RoutingGemm,
    ) -> Result<()> {
        let RoutingGemm {
            chunks,
            tokens,
            per_kv,
            batch,
            width,
            key_row,
            ..
        } = dims;
        let rows = tokens * per_kv;
        let (parts, data_type) =
            self.to_half(query, batch * rows * width, keys.1, Some(rows * width))?;
        let gemm_rows = 2 * rows;
        let tile = chunks.min(ROUTING_TILE_CHUNKS);
        let mut dots = self.alloc::<f32>(batch * gemm_rows * tile)?;
        let stream = &self.device.stream;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (tokens32, per_kv32, batch32) = (tokens as u32, per_kv as u32, batch as u32);
        for first in (0..chunks).step_by(tile) {
            let n = tile.min(chunks - first);
            {
                let (q_ptr, _q) = parts.device_ptr(stream);
                let (k_ptr, _k) = keys.0.device_ptr(stream);
                let (c_ptr, _c) = dots.device_ptr_mut(stream);
                let k_ptr = k_ptr + (first * key_row * 2) as u64;
                // SAFETY: A is [batch][2 × rows][width], B the tile's [n][key_row] keys (GEMM g reads
                // `width` elements from g × width of each row: batch × width <= key_row), C
                // [batch][n][2 × rows] f32, all within their allocations; alpha and beta are f32 as
                // CUBLAS_COMPUTE_32F requires.
                self.device.launch("cuBLAS routing GEMM", || unsafe {
                    cudarc::cublas::result::gemm_strided_batched_ex(
                        *self.device.blas.handle(),
                        cublasOperation_t::CUBLAS_OP_T,
                        cublasOperation_t::CUBLAS_OP_N,
                        gemm_rows as i32,
                        n as i32,
                        width as i32,
                        (&alpha as *const f32).cast(),
                        q_ptr as *const _,
                        data_type,
                        width as i32,
                        (gemm_rows * width) as i64,
                        k_ptr as *const _,
                        data_type,
                        key_row as i32,
                        width as i64,
                        (&beta as *const f32).cast(),
                        c_ptr as *mut _,
                        cudaDataType::CUDA_R_32F,
                        gemm_rows as i32,
                        (gemm_rows * n) as i64,
                        batch as i32,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                    .map_err(|e| self.device.error(e))
                })?;
            }
            let (first64, n32) = (first as u64, n as u32);
            let mut args = self.args("routing_reduce");
            args.arg(&dots)
                .arg(&mut *chunk_scores)
                .arg(&first64)
                .arg(&n32)
                .arg(&tokens32)
                .arg(&per_kv32)
                .arg(&batch32)
                .arg(&dims.head_mean)
                .arg(&dims.head_divisor)
                .arg(&dims.query_reduce);
            self.launch(&mut args, grid_for_threads(n as u64))?;
        }
        Ok(())
    }

    /// Whether `routing_mma` takes a head mean over these keys: on sm_80 and newer (unless cuBLAS was
    /// asked for), with chunk rows of whole 32-element steps starting 16-byte aligned, as its loads
    /// need.
    fn mma_routes(&self, keys: &CudaSlice<u16>, width: usize) -> bool {
        let (address, _keys) = keys.device_ptr(&self.device.stream);
        self.device.fused_routing && width.is_multiple_of(32) && address.is_multiple_of(16)
    }

    /// Chunk scores of a head mean on tensor cores in one kernel (`routing_mma`): the query split
    /// into hi and lo half-precision parts as for [`Self::routing_gemm`], multiplied with each chunk's
    /// key row and reduced over tokens in registers, so only one score per chunk is written.
    fn routing_mma(
        &self,
        query: &CudaSlice<f32>,
        keys: (&CudaSlice<u16>, DType),
        chunk_scores: &mut CudaSlice<f32>,
        dims: RoutingGemm,
    ) -> Result<()> {
        let RoutingGemm {
            chunks,
            tokens,
            width,
            head_divisor,
            query_reduce,
            ..
        } = dims;
        let (parts, _) = self.to_half(query, tokens * width, keys.1, Some(tokens * width))?;
        let kernel = format!("routing_mma_{}", kernel_suffix(keys.1));
        let (chunks64, tokens32, width32) = (chunks as u64, tokens as u32, width as u32);
        let mut args = self.args(&kernel);
        args.arg(&parts)
            .arg(keys.0)
            .arg(&mut *chunk_scores)
            .arg(&chunks64)
            .arg(&tokens32)
            .arg(&width32)
            .arg(&head_divisor)
            .arg(&query_reduce);
        // One warp per 32 chunks, in blocks of ROUTING_MMA_WARPS (the kernel loops past 2^20 blocks).
        let blocks = chunks
            .div_ceil(32 * ROUTING_MMA_WARPS as usize)
            .clamp(1, 1 << 20);
        let config = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (ROUTING_MMA_WARPS * WARP, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(&mut args, config)
    }

    /// rope's `[n, d/2]` (cos, sin) table of `positions`, uploaded once for a run of calls at the
    /// same positions.
    fn rope_table(&self, positions: &[u32], theta: f64, d: usize) -> Result<CudaTensor> {
        self.rope.get(positions, theta, d, |table| {
            let table = table.as_flattened();
            self.upload(table, &[table.len()])
        })
    }

    /// `x · Wᵀ` for at most [`SMALL_ROWS`] rows by `matmul_small` (kernels.cu) in the specialisation
    /// `fusion` names: one warp per output feature, each weight row read once. The caller has checked
    /// that a fusion's weights share the projection's dtype.
    fn small_projection(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        fusion: SmallFusion<'_>,
    ) -> Result<CudaTensor> {
        let (n, inner, out_features) = shapes::matmul_dims(&x.shape, &weight.shape)?;
        let (mut y, shape) = self.tensor(vec![n, out_features])?;
        if n == 0 {
            return Ok(Self::wrap(y, shape));
        }
        // The arguments a specialisation does not read are bound to the projection's own.
        let (name, up, norm, residual, eps) = match fusion {
            SmallFusion::None => ("matmul_small", weight, weight, x, 0.0),
            SmallFusion::Residual(residual) => ("matmul_residual", weight, weight, residual, 0.0),
            SmallFusion::Norm { norm, eps } => ("matmul_norm", weight, norm, x, eps),
            SmallFusion::NormSwiglu { norm, eps, up } => ("norm_swiglu", up, norm, x, eps),
        };
        let kernel = format!("{name}_{}", weight.suffix());
        // 16-byte loads need every weight row to start on a 16-byte boundary.
        let vectorised = u32::from((inner * weight.dtype.size_in_bytes()).is_multiple_of(16));
        let (rows, inner, outs) = (n as u32, inner as u32, out_features as u32);
        let mut args = self.args(&kernel);
        args.arg(x.data.as_ref());
        weight_arg(&mut args, &weight.data);
        weight_arg(&mut args, &up.data);
        weight_arg(&mut args, &norm.data);
        args.arg(residual.data.as_ref())
            .arg(&mut y)
            .arg(&rows)
            .arg(&inner)
            .arg(&outs)
            .arg(&vectorised)
            .arg(&eps);
        self.launch(&mut args, grid_for_warps(out_features as u64))?;
        Ok(Self::wrap(y, shape))
    }

    fn elementwise(&self, kernel: &str, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        let (mut out, shape) = self.tensor(a.shape.clone())?;
        let total = a.len() as u64;
        let mut args = self.args(kernel);
        args.arg(a.data.as_ref())
            .arg(b.data.as_ref())
            .arg(&mut out)
            .arg(&total);
        self.launch(&mut args, grid_for_threads(total))?;
        Ok(Self::wrap(out, shape))
    }

    /// Queues the top k of one score per document: on the device, rounds of `select_top_k` until one
    /// block's k (raw score, index) pairs remain, which are all the host reads, once they have landed.
    /// Past [`MAX_DEVICE_K`] the host selects from every score by the reference rule, at once.
    fn queue_top_k(&self, scores: &CudaTensor, k: usize) -> Result<QueuedTopK> {
        shapes::check_scores(&scores.shape)?;
        let k = k.min(scores.len());
        if k == 0 {
            return Ok(QueuedTopK::Selected(Vec::new()));
        }
        // Indices are u32 on the device, u32::MAX marking an empty slot.
        if k > MAX_DEVICE_K || scores.len() >= Scored::NO_INDEX as usize {
            return Ok(QueuedTopK::Selected(select_top_k(
                &self.read_now(scores)?,
                k,
            )));
        }
        let block = TOP_K_THREADS as usize * TOP_K_ITEMS;
        let mut count = scores.len();
        let mut survivors: Option<CudaSlice<u32>> = None;
        loop {
            let blocks = count.div_ceil(block);
            let mut dst = self.alloc::<u32>(2 * blocks * k)?;
            let (count32, k32, pairs) = (count as u32, k as u32, u32::from(survivors.is_some()));
            let mut args = self.args("select_top_k");
            match &survivors {
                Some(pairs) => args.arg(pairs),
                None => args.arg(scores.data.as_ref()),
            };
            args.arg(&mut dst).arg(&count32).arg(&k32).arg(&pairs);
            let config = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (TOP_K_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(&mut args, config)?;
            if blocks == 1 {
                return Ok(QueuedTopK::Landing {
                    pairs: self.device.read_back(&dst, 2 * k)?,
                    device: self.device.clone(),
                });
            }
            count = blocks * k;
            survivors = Some(dst);
        }
    }

    /// Copies a tensor to the host, waiting for the ops it depends on.
    fn read_now(&self, tensor: &CudaTensor) -> Result<Vec<f32>> {
        let stream = &self.device.stream;
        let mut host = vec![0.0f32; tensor.len()];
        if !host.is_empty() {
            (self.device.counters)
                .wait(|| {
                    stream
                        .memcpy_dtoh(&tensor.data.slice(0..host.len()), &mut host)
                        .and_then(|()| stream.synchronize())
                })
                .map_err(|e| self.device.error(e))?;
        }
        Ok(host)
    }

    /// Splits of each (query, head)'s keys for attention over `blocks` (query, head) pairs whose
    /// longest key range is `longest`: enough blocks for two per multiprocessor where the pairs alone
    /// are fewer (decoding: one query), and no more splits than `longest` holds [`MIN_SPLIT_KEYS`].
    fn attention_splits(&self, blocks: usize, longest: usize) -> usize {
        let wanted = 2 * self.device.multiprocessors;
        if blocks == 0 || blocks >= wanted {
            return 1;
        }
        wanted
            .div_ceil(blocks)
            .min(longest.div_ceil(MIN_SPLIT_KEYS))
            .clamp(1, u16::MAX as usize)
    }

    fn check_head_dim(&self, op: &'static str, d: usize) -> Result<()> {
        if d > MAX_HEAD_DIM {
            return Err(msa_engine::Error::shape(
                op,
                format!("head_dim {d}: the CUDA kernels hold at most {MAX_HEAD_DIM} per head"),
            ));
        }
        Ok(())
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;

    fn describe(&self) -> String {
        format!("cuda: {}", self.device.name)
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<CudaTensor> {
        shapes::check_fill("upload", data.len(), &[data.len()], shape)?;
        Ok(Self::wrap(self.upload_slice(data)?, shape.to_vec()))
    }

    fn upload_weight(&self, view: TensorView<'_>) -> Result<CudaWeight> {
        shapes::check_weight_bytes(&view)?;
        let data = match view.dtype {
            DType::F32 => WeightData::F32(Arc::new(self.upload_bytes(view.bytes)?)),
            DType::BF16 | DType::F16 => WeightData::Half(self.upload_bytes(view.bytes)?),
        };
        Ok(CudaWeight {
            data,
            dtype: view.dtype,
            shape: view.shape.to_vec(),
        })
    }

    fn upload_weight_from(
        &self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        write: &mut PieceWriter<'_, '_>,
    ) -> Result<CudaWeight> {
        let data = match dtype {
            DType::F32 => WeightData::F32(Arc::new(self.gathered(name, dtype, shape, write)?)),
            DType::BF16 | DType::F16 => WeightData::Half(self.gathered(name, dtype, shape, write)?),
        };
        Ok(CudaWeight {
            data,
            dtype,
            shape: shape.to_vec(),
        })
    }

    fn tensor_to_weight(&self, tensor: &CudaTensor) -> Result<CudaWeight> {
        Ok(CudaWeight {
            data: WeightData::F32(tensor.data.clone()),
            dtype: DType::F32,
            shape: tensor.shape.clone(),
        })
    }

    fn broadcast(&self, tensor: &CudaTensor, peers: &[&Self]) -> Option<Result<Vec<CudaTensor>>> {
        self.broadcast_in_clique(tensor, peers)
    }

    fn link_kind(&self) -> Option<String> {
        self.nccl_link_kind()
    }

    fn link_rendezvous(&self) -> Result<Vec<u8>> {
        self.nccl_rendezvous()
    }

    fn join_link(&self, rendezvous: &[u8], end: usize) -> Result<Box<dyn DeviceLink<Self>>> {
        self.join_nccl_link(rendezvous, end)
    }

    fn read(&self, tensor: &CudaTensor) -> impl Future<Output = Result<Vec<f32>>> {
        ready(self.read_now(tensor))
    }

    fn synchronize(&self) -> impl Future<Output = Result<()>> {
        let device = &self.device;
        ready(
            (device.counters)
                .wait(|| device.stream.synchronize())
                .map_err(|e| device.error(e)),
        )
    }

    fn shape(&self, tensor: &CudaTensor) -> Vec<usize> {
        tensor.shape.clone()
    }

    fn reshape(&self, tensor: &CudaTensor, shape: &[usize]) -> Result<CudaTensor> {
        shapes::check_fill("reshape", tensor.len(), &tensor.shape, shape)?;
        Ok(CudaTensor {
            data: tensor.data.clone(),
            shape: shape.to_vec(),
        })
    }

    fn embedding(&self, table: &CudaWeight, ids: &[u32]) -> Result<CudaTensor> {
        let (_, hidden) = shapes::embedding_dims(&table.shape, ids)?;
        let kernel = format!("gather_{}", table.suffix());
        self.gather(&kernel, &table.data, ids, hidden, vec![ids.len(), hidden])
    }

    fn matmul(&self, x: &CudaTensor, weight: &CudaWeight) -> Result<CudaTensor> {
        let (n, inner, out_features) = shapes::matmul_dims(&x.shape, &weight.shape)?;
        if n <= SMALL_ROWS {
            return self.small_projection(x, weight, SmallFusion::None);
        }
        let (mut y, shape) = self.tensor(vec![n, out_features])?;
        self.gemm(x, weight, &mut y, (n, inner, out_features))?;
        Ok(Self::wrap(y, shape))
    }

    fn norm_matmul(
        &self,
        x: &CudaTensor,
        norm: &CudaWeight,
        eps: f32,
        weight: &CudaWeight,
    ) -> Result<CudaTensor> {
        // The fused norm runs over the whole row: only a [rows, width] input has the norm's width.
        if norm.dtype != weight.dtype || x.shape.len() != 2 || x.shape[0] > SMALL_ROWS {
            return self.matmul(&self.rms_norm(x, norm, eps)?, weight);
        }
        shapes::rms_norm_width(&x.shape, &norm.shape)?;
        self.small_projection(x, weight, SmallFusion::Norm { norm, eps })
    }

    fn norm_rope(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        eps: f32,
        positions: &[u32],
        theta: f64,
    ) -> Result<CudaTensor> {
        let width = shapes::rms_norm_width(&x.shape, &weight.shape)?;
        let (n, heads, d) = shapes::rope_dims(&x.shape, positions.len())?;
        debug_assert_eq!(width, d);
        let table = self.rope_table(positions, theta, d)?;
        let (mut out, shape) = self.tensor(x.shape.clone())?;
        let (rows, heads32, d32) = ((n * heads) as u64, heads as u32, d as u32);
        let kernel = format!("norm_rope_{}", weight.suffix());
        let mut args = self.args(&kernel);
        args.arg(x.data.as_ref());
        weight_arg(&mut args, &weight.data);
        args.arg(table.data.as_ref())
            .arg(&mut out)
            .arg(&rows)
            .arg(&heads32)
            .arg(&d32)
            .arg(&eps);
        self.launch(&mut args, grid_for_warps(rows))?;
        Ok(Self::wrap(out, shape))
    }

    fn matmul_add(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        residual: &CudaTensor,
    ) -> Result<CudaTensor> {
        let (n, _, out_features) = shapes::matmul_dims(&x.shape, &weight.shape)?;
        shapes::same_shape("matmul_add", &residual.shape, &[n, out_features])?;
        if n > SMALL_ROWS {
            return self.add(residual, &self.matmul(x, weight)?);
        }
        self.small_projection(x, weight, SmallFusion::Residual(residual))
    }

    fn norm_swiglu(
        &self,
        x: &CudaTensor,
        norm: &CudaWeight,
        eps: f32,
        gate: &CudaWeight,
        up: &CudaWeight,
    ) -> Result<CudaTensor> {
        // One pass reads the three weights with one loader: they must share a dtype. The fused norm
        // runs over the whole row: only a [rows, width] input has the norm's width.
        let fusable = norm.dtype == gate.dtype
            && up.dtype == gate.dtype
            && up.shape == gate.shape
            && x.shape.len() == 2
            && x.shape[0] <= SMALL_ROWS;
        if !fusable {
            let normed = self.rms_norm(x, norm, eps)?;
            return self.silu_mul(&self.matmul(&normed, gate)?, &self.matmul(&normed, up)?);
        }
        shapes::rms_norm_width(&x.shape, &norm.shape)?;
        self.small_projection(x, gate, SmallFusion::NormSwiglu { norm, eps, up })
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        let width = shapes::rms_norm_width(&x.shape, &weight.shape)?;
        let (mut out, shape) = self.tensor(x.shape.clone())?;
        let rows = (x.len() / width) as u64;
        let width = width as u32;
        let kernel = format!("rms_norm_{}", weight.suffix());
        let mut args = self.args(&kernel);
        args.arg(x.data.as_ref());
        weight_arg(&mut args, &weight.data);
        args.arg(&mut out).arg(&rows).arg(&width).arg(&eps);
        self.launch(&mut args, grid_for_warps(rows))?;
        Ok(Self::wrap(out, shape))
    }

    fn rope(&self, x: &CudaTensor, positions: &[u32], theta: f64) -> Result<CudaTensor> {
        let (n, heads, d) = shapes::rope_dims(&x.shape, positions.len())?;
        let table = self.rope_table(positions, theta, d)?;
        let (mut out, shape) = self.tensor(x.shape.clone())?;
        let (n32, heads32, d32) = (n as u32, heads as u32, d as u32);
        let mut args = self.args("rope");
        args.arg(x.data.as_ref())
            .arg(table.data.as_ref())
            .arg(&mut out)
            .arg(&n32)
            .arg(&heads32)
            .arg(&d32);
        self.launch(&mut args, grid_for_threads((n * heads * (d / 2)) as u64))?;
        Ok(Self::wrap(out, shape))
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        mask: AttentionMask<'_>,
    ) -> Result<CudaTensor> {
        let shapes::AttentionDims {
            nq,
            heads,
            d,
            nk,
            kv_heads,
        } = shapes::attention_dims(&q.shape, &k.shape, &v.shape)?;
        shapes::attention_mask(&mask, nq, nk)?;
        self.check_head_dim("attention", d)?;
        let (mut out, shape) = self.tensor(vec![nq, heads, d])?;
        if nq == 0 {
            return Ok(Self::wrap(out, shape));
        }
        // The mask, resolved per query into the range of keys it sees.
        let ranges: Vec<u32> = (0..nq)
            .flat_map(|i| {
                let keys = mask.visible_keys(i, nq, nk);
                [keys.start as u32, keys.end as u32]
            })
            .collect();
        let longest = ranges.chunks_exact(2).map(|r| r[1] - r[0]).max();
        let splits = self.attention_splits(nq * heads, longest.unwrap_or(0) as usize);
        let ranges = self.upload_slice(&ranges)?;
        let scale = 1.0 / (d as f32).sqrt();
        let (heads32, kv32, d32) = (heads as u32, kv_heads as u32, d as u32);
        // Split-KV: each split's unnormalised sums and (m, l), merged by attention_combine. One split
        // writes the output itself and leaves these untouched.
        let parts = if splits > 1 { nq * heads * splits } else { 0 };
        let mut partial = self.alloc::<f32>(parts * d)?;
        let mut stats = self.alloc::<f32>(parts * 2)?;
        let mut args = self.args("attention");
        args.arg(q.data.as_ref())
            .arg(k.data.as_ref())
            .arg(v.data.as_ref())
            .arg(&ranges)
            .arg(&mut out)
            .arg(&mut partial)
            .arg(&mut stats)
            .arg(&heads32)
            .arg(&kv32)
            .arg(&d32)
            .arg(&scale);
        let config = LaunchConfig {
            grid_dim: (nq as u32, heads as u32, splits as u32),
            block_dim: (ATTENTION_WARPS * WARP, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(&mut args, config)?;
        if splits > 1 {
            let (rows, splits32) = ((nq * heads) as u64, splits as u32);
            let mut args = self.args("attention_combine");
            args.arg(&partial)
                .arg(&stats)
                .arg(&mut out)
                .arg(&rows)
                .arg(&d32)
                .arg(&splits32);
            self.launch(&mut args, grid_for_threads(rows * d as u64))?;
        }
        Ok(Self::wrap(out, shape))
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        shapes::same_shape("silu_mul", &gate.shape, &up.shape)?;
        self.elementwise("silu_mul", gate, up)
    }

    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        shapes::same_shape("add", &a.shape, &b.shape)?;
        self.elementwise("add", a, b)
    }

    fn concat_rows(&self, parts: &[&CudaTensor]) -> Result<CudaTensor> {
        let part_shapes: Vec<&[usize]> = parts.iter().map(|p| &p.shape[..]).collect();
        let shape = shapes::concat_shape(&part_shapes)?;
        let (mut out, shape) = self.tensor(shape)?;
        let mut offset = 0;
        for part in parts {
            self.copy(&part.data, 0, &mut out, offset, part.len())?;
            offset += part.len();
        }
        Ok(Self::wrap(out, shape))
    }

    fn append_rows(&self, mut held: CudaTensor, parts: &[&CudaTensor]) -> Result<CudaTensor> {
        let part_shapes: Vec<&[usize]> = parts.iter().map(|p| &p.shape[..]).collect();
        let shape = shapes::append_shape(&held.shape, &part_shapes)?;
        let (rows, width) = shapes::rows_and_width(&shape);
        let mut offset = held.len();
        // An allocation only this tensor holds takes the parts in its rows past `held`'s when it
        // has room (the ops queued on that allocation read only `held`'s rows); otherwise `held` is
        // copied to a new one with room for more.
        let room = Arc::get_mut(&mut held.data).is_some_and(|data| data.len() >= rows * width);
        let mut data = if room {
            held.data
        } else {
            let mut grown = self.alloc_context(rows, width)?;
            self.copy(&held.data, 0, &mut grown, 0, offset)?;
            Arc::new(grown)
        };
        let out = Arc::get_mut(&mut data).expect("held by this tensor alone");
        for part in parts {
            self.copy(&part.data, 0, out, offset, part.len())?;
            offset += part.len();
        }
        Ok(CudaTensor { data, shape })
    }

    fn rows(&self, tensor: &CudaTensor, range: Range<usize>) -> Result<CudaTensor> {
        let shape = shapes::rows_shape(&tensor.shape, &range)?;
        let (_, width) = shapes::rows_and_width(&tensor.shape);
        let (mut out, shape) = self.tensor(shape)?;
        let len = range.len() * width;
        self.copy(&tensor.data, range.start * width, &mut out, 0, len)?;
        Ok(Self::wrap(out, shape))
    }

    fn gather_rows(&self, tensor: &CudaTensor, indices: &[u32]) -> Result<CudaTensor> {
        let shape = shapes::gather_shape(&tensor.shape, indices)?;
        let (_, width) = shapes::rows_and_width(&tensor.shape);
        self.gather(
            "gather_f32",
            &WeightData::F32(tensor.data.clone()),
            indices,
            width,
            shape,
        )
    }

    fn chunk_mean_pool(&self, x: &CudaTensor, chunk: usize) -> Result<CudaTensor> {
        let shape = shapes::pool_shape(&x.shape, chunk)?;
        let (rows, width) = shapes::rows_and_width(&x.shape);
        let (mut out, shape) = self.tensor(shape)?;
        let total = shape.iter().product::<usize>() as u64;
        let (rows, width, chunk) = (rows as u64, width as u32, chunk as u32);
        let mut args = self.args("chunk_mean_pool");
        args.arg(x.data.as_ref())
            .arg(&mut out)
            .arg(&rows)
            .arg(&width)
            .arg(&chunk);
        self.launch(&mut args, grid_for_threads(total))?;
        Ok(Self::wrap(out, shape))
    }

    fn l2_normalize(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let width = shapes::norm_width("l2_normalize", &x.shape)?;
        let (mut out, shape) = self.tensor(x.shape.clone())?;
        let rows = (x.len() / width) as u64;
        let width = width as u32;
        let mut args = self.args("l2_normalize");
        args.arg(x.data.as_ref())
            .arg(&mut out)
            .arg(&rows)
            .arg(&width);
        self.launch(&mut args, grid_for_warps(rows))?;
        Ok(Self::wrap(out, shape))
    }

    fn routing_scores(
        &self,
        queries: &CudaTensor,
        routing_rows: &[u32],
        keys: &CudaWeight,
        doc_chunk_offsets: &[u32],
        spec: RoutingSpec,
    ) -> Result<CudaTensor> {
        let shapes::RoutingDims {
            heads,
            d,
            chunks,
            kv_heads,
            documents,
        } = shapes::routing_dims(&queries.shape, routing_rows, &keys.shape, doc_chunk_offsets)?;
        self.check_head_dim("routing_scores", d)?;
        // 1. The routing query: normalised or scaled per head, and summed per KV group when the head
        //    reduction is a mean (it is linear), so each key is read with one dot per group.
        let group = match spec.head_reduce {
            HeadReduce::Mean => heads / kv_heads,
            HeadReduce::Max => 1,
        };
        let outputs = heads / group;
        let tokens = routing_rows.len();
        let (cosine, scale) = match spec.score_mode {
            ScoreMode::Cosine => (1u32, 1.0f32),
            ScoreMode::ScaledDot => (0u32, 1.0 / (d as f32).sqrt()),
        };
        // Half-precision keys (a bank's) are scored on tensor cores once the query has at least
        // ROUTING_GEMM_MIN_ROWS rows per KV head (see `routing_gemm`); f32 keys and shorter queries
        // by the f32 scan, one warp per chunk (a one-row GEMM is a matrix-vector product cuBLAS runs
        // slower).
        let per_kv = outputs / kv_heads;
        let half_keys = match &keys.data {
            WeightData::Half(data) if tokens * per_kv >= ROUTING_GEMM_MIN_ROWS => {
                Some((data, keys.dtype))
            }
            _ => None,
        };
        let head_mean = spec.head_reduce == HeadReduce::Mean;
        let rows = self.upload_slice(routing_rows)?;
        let mut query = self.alloc::<f32>(tokens * outputs * d)?;
        let (tokens32, heads32, kv32, d32, group32, grouped) = (
            tokens as u32,
            heads as u32,
            kv_heads as u32,
            d as u32,
            group as u32,
            // A head mean's GEMM takes the query per token, as the scan does: [tokens, kv_heads, d]
            // is one row per token against whole chunk rows.
            u32::from(half_keys.is_some() && !head_mean),
        );
        let mut args = self.args("routing_query");
        args.arg(queries.data.as_ref())
            .arg(&rows)
            .arg(&mut query)
            .arg(&tokens32)
            .arg(&heads32)
            .arg(&kv32)
            .arg(&d32)
            .arg(&group32)
            .arg(&cosine)
            .arg(&scale)
            .arg(&grouped);
        self.launch(&mut args, grid_for_warps((tokens * outputs) as u64))?;
        // 2. One score per chunk.
        let mut chunk_scores = self.alloc::<f32>(chunks)?;
        let head_mean32 = u32::from(head_mean);
        let head_divisor = heads as f32;
        let query_reduce: u32 = match spec.query_reduce {
            QueryReduce::Max => 0,
            QueryReduce::Mean => 1,
            QueryReduce::Last => 2,
        };
        if let Some(half) = half_keys {
            let (batch, width) = if head_mean {
                (1, kv_heads * d)
            } else {
                (kv_heads, d)
            };
            let dims = RoutingGemm {
                chunks,
                tokens,
                per_kv,
                batch,
                width,
                key_row: kv_heads * d,
                head_mean: head_mean32,
                head_divisor,
                query_reduce,
            };
            if head_mean && self.mma_routes(half.0, width) {
                self.routing_mma(&query, half, &mut chunk_scores, dims)?;
            } else {
                self.routing_gemm(&query, half, &mut chunk_scores, dims)?;
            }
        } else {
            let (chunks64, outputs32) = (chunks as u64, outputs as u32);
            // Whole 16-byte vectors per chunk row (8 halves or 4 f32): every row starts on one.
            let per_vector = 16 / keys.dtype.size_in_bytes();
            let vectorised = u32::from((kv_heads * d).is_multiple_of(per_vector));
            let kernel = format!("routing_chunks_{}", keys.suffix());
            let mut args = self.args(&kernel);
            args.arg(&query);
            weight_arg(&mut args, &keys.data);
            args.arg(&mut chunk_scores)
                .arg(&chunks64)
                .arg(&tokens32)
                .arg(&outputs32)
                .arg(&kv32)
                .arg(&d32)
                .arg(&head_mean32)
                .arg(&head_divisor)
                .arg(&query_reduce)
                .arg(&vectorised);
            self.launch(&mut args, grid_for_warps(chunks as u64))?;
        }
        // 3. One score per document.
        let offsets = self.upload_slice(doc_chunk_offsets)?;
        let (mut out, shape) = self.tensor(vec![documents])?;
        let (documents32, mean) = (
            documents as u32,
            u32::from(spec.chunk_reduce == ChunkReduce::Mean),
        );
        let mut args = self.args("routing_documents");
        args.arg(&chunk_scores)
            .arg(&offsets)
            .arg(&mut out)
            .arg(&documents32)
            .arg(&mean);
        self.launch(&mut args, grid_for_threads(documents as u64))?;
        Ok(Self::wrap(out, shape))
    }

    fn top_k(&self, scores: &CudaTensor, k: usize) -> impl Future<Output = Result<Vec<Scored>>> {
        let queued = self.queue_top_k(scores, k);
        async move {
            match queued? {
                QueuedTopK::Selected(top) => Ok(top),
                QueuedTopK::Landing { pairs, device } => pairs
                    .words()
                    .map(Scored::from_device_pairs)
                    .map_err(|e| device.error(e)),
            }
        }
    }
}
