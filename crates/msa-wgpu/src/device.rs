//! Adapter selection and device creation.
//!
//! The instance is built from the environment, so `WGPU_BACKEND` works. The adapter is chosen here,
//! not by wgpu's `WGPU_ADAPTER_NAME` helper (which panics when nothing matches): a case-insensitive
//! substring of the adapter name when one is asked for, otherwise the most capable kind (discrete GPU,
//! then integrated, virtual, CPU). The device gets the adapter's own limits and whichever optional
//! features it has; kernels fall back when a feature is missing.

use std::fmt;

use crate::error::WgpuError;

/// How to open a device.
#[derive(Clone, Debug, Default)]
pub struct DeviceOptions {
    /// Case-insensitive substring of the adapter name; `None` picks the best adapter.
    pub adapter: Option<String>,
    /// Which of the matching adapters, best first (see [`list_adapters`]): one device per GPU for
    /// Memory Parallel. `None` is the first.
    pub index: Option<usize>,
    /// Caps the storage-buffer binding size below the adapter's limit (browsers default to 128 MiB).
    /// Larger tensors are bound in windows; tests use a small cap to exercise that path.
    pub max_binding_bytes: Option<u64>,
    /// Caps the buffer size below the adapter's limit (browsers default to 256 MiB). Larger weights
    /// are split by rows into several buffers.
    pub max_buffer_bytes: Option<u64>,
    /// Kernel variants instead of [`Variants::for_adapter`]'s choice (tests run every variant on one
    /// adapter; `msa bench --kernels` compares them).
    pub variants: Option<Variants>,
}

/// Kernel variants chosen per adapter: what suits a software adapter (no workgroup barriers, one
/// invocation per tile) loses on a GPU (each invocation streaming its own weight row: no coalescing),
/// and the reverse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variants {
    /// Invocations sharing one projection tile (`SPLIT` in matmul.wgsl): a power of two from 1 to 64.
    pub matmul_split: u32,
    /// Blocks of rows (prefill, stage 1) take the workgroup-tiled GEMM (`matmul_tiled` in
    /// matmul.wgsl) where their shape allows it.
    pub matmul_tiles: bool,
    /// Output columns per tile of a one-token projection (decode; `COLS` in matmul.wgsl): 1 to 4.
    pub decode_columns: u32,
    /// Chunks each routing-scan invocation scores (`CHUNKS` in routing.wgsl): 1, 2, 4 or 8.
    pub routing_chunks: u32,
    /// Keys each attention invocation scores per tile (`KEYS` in attention.wgsl): 1, 2 or 4.
    pub attention_keys: u32,
    /// 16-byte words of the output dims each attention invocation accumulates (`WORDS` in
    /// attention.wgsl): 1 or 2.
    pub attention_words: u32,
    /// Reductions (projection splits, norms, attention's tile max, top-k) exchange values within
    /// subgroups in registers before they turn to workgroup memory, where the device has subgroup
    /// operations (`SUBGROUP` in common.wgsl).
    pub subgroups: bool,
}

impl Variants {
    /// The table, from `msa bench --kernels` (its "other var" column times the variant not chosen)
    /// and `msa bench`:
    /// - CPU adapters (lavapipe, SwiftShader, WARP) run the barrier-free kernels, where a workgroup
    ///   barrier is a thread synchronisation: lavapipe's decode GEMV took 722 ms split 64 ways
    ///   against 149 ms alone, its 128-row GEMM 17.9 s against 6.3 s;
    /// - GPUs split every tile 64 ways. An H100 through Vulkan: decode GEMV 0.19 ms against 0.47 ms,
    ///   down_proj with its residual 0.16 ms against 1.66 ms; a 128-row GEMM alone prefers one
    ///   invocation per tile (6.95 ms against 8.68 ms), but the whole pipeline does not: stage 1 at
    ///   128 tokens/s against 70, a 19-token prefill in 208 ms against 819;
    /// - an adapter of unknown type keeps the barrier-free kernels: a browser's WebGPU adapter is one
    ///   (wgpu learns no more than "fallback or not" there), and it may be SwiftShader, a CPU; the
    ///   browser names the vendor to [`Variants::for_web_adapter`].
    ///
    /// On CPU adapters every load an invocation makes costs about the same, whether all invocations
    /// read the same address or not (lavapipe runs a load as one load per lane), so operands every
    /// invocation reads are shared through registers instead: a decode projection takes 4 columns
    /// per tile (each x value serves 4 weight rows; lavapipe's gate_proj GEMV 69 ms against 131 ms),
    /// and the routing scan scores 8 chunks per invocation (the query loaded once per 8 chunks: 39 ms
    /// against 91 ms per router layer at 1M memory tokens), attention 4 keys per invocation and 2
    /// output words (each query word loaded once per 4 keys, each probability once per 8 dims:
    /// lavapipe's decode attention over 324 keys 1.7 ms against 4.1 ms). GPUs broadcast such loads
    /// from cache and want every invocation they can get: one column, one chunk, one key, one word.
    ///
    /// Both rows use subgroup reductions where the device has subgroups: a split projection's partial
    /// sums meet in registers within each subgroup, and only across subgroups in workgroup memory,
    /// so 64-way splits take log2(64 / subgroup size) barrier rounds instead of 6 (lavapipe, 8 lanes:
    /// the split-64 gate_proj GEMV 35–39 ms against 41–45 ms); the CPU row's kernels barely reduce
    /// across invocations and time the same either way.
    pub fn for_adapter(info: &wgpu::AdapterInfo) -> Self {
        use wgpu::DeviceType::{DiscreteGpu, IntegratedGpu, VirtualGpu};
        Self::row(matches!(
            info.device_type,
            DiscreteGpu | IntegratedGpu | VirtualGpu
        ))
    }

    /// The table for a browser's WebGPU adapter, from what WebGPU's `GPUAdapterInfo` names: GPU
    /// variants for a GPU maker's `vendor`, CPU ones for anything else (SwiftShader reports vendor
    /// `google`, architecture `swiftshader`; an empty vendor says nothing).
    pub fn for_web_adapter(vendor: &str, architecture: &str) -> Self {
        const GPU_VENDORS: [&str; 8] = [
            "nvidia",
            "amd",
            "intel",
            "apple",
            "qualcomm",
            "arm",
            "imagination",
            "samsung",
        ];
        let vendor = vendor.trim().to_ascii_lowercase();
        let software = architecture.to_ascii_lowercase().contains("swiftshader");
        Self::row(!software && GPU_VENDORS.iter().any(|v| vendor.starts_with(v)))
    }

    /// The GPU row or the CPU row of the table.
    fn row(gpu: bool) -> Self {
        Variants {
            matmul_split: if gpu { 64 } else { 1 },
            matmul_tiles: gpu,
            decode_columns: if gpu { 1 } else { 4 },
            routing_chunks: if gpu { 1 } else { 8 },
            attention_keys: if gpu { 1 } else { 4 },
            attention_words: if gpu { 1 } else { 2 },
            subgroups: true,
        }
    }

    /// The variants the table does not choose for this adapter (the other row, subgroups as they
    /// are), for comparison.
    pub fn other(self) -> Self {
        Variants {
            matmul_split: if self.matmul_split == 1 { 64 } else { 1 },
            matmul_tiles: !self.matmul_tiles,
            decode_columns: if self.decode_columns == 1 { 4 } else { 1 },
            routing_chunks: if self.routing_chunks == 1 { 8 } else { 1 },
            attention_keys: if self.attention_keys == 1 { 4 } else { 1 },
            attention_words: if self.attention_words == 1 { 2 } else { 1 },
            // Not a choice of the table: both rows use subgroups where the device has them.
            subgroups: self.subgroups,
        }
    }

    /// Why the kernels cannot take these variants, if they cannot: the first field out of range.
    pub fn check(&self) -> Result<(), String> {
        let power_of_two_to = |value: u32, max: u32| value.is_power_of_two() && value <= max;
        let rules = [
            (
                power_of_two_to(self.matmul_split, 64),
                "a projection split must be a power of two from 1 to 64",
                self.matmul_split,
            ),
            (
                (1..=4).contains(&self.decode_columns),
                "decode columns per tile must be from 1 to 4",
                self.decode_columns,
            ),
            (
                power_of_two_to(self.routing_chunks, 8),
                "routing chunks per invocation must be a power of two from 1 to 8",
                self.routing_chunks,
            ),
            (
                power_of_two_to(self.attention_keys, 4),
                "attention keys per invocation must be 1, 2 or 4",
                self.attention_keys,
            ),
            (
                (1..=2).contains(&self.attention_words),
                "attention words per invocation must be 1 or 2",
                self.attention_words,
            ),
        ];
        match rules.iter().find(|(ok, _, _)| !ok) {
            Some((_, rule, value)) => Err(format!("{rule}, not {value}")),
            None => Ok(()),
        }
    }
}

impl fmt::Display for Variants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "projection split {}{}, {} decode column{} per tile, routing {} chunk{} per invocation, \
             attention {} key{} and {} output word{} per invocation, {} reductions",
            self.matmul_split,
            if self.matmul_tiles {
                ", tiled GEMM"
            } else {
                ""
            },
            self.decode_columns,
            if self.decode_columns == 1 { "" } else { "s" },
            self.routing_chunks,
            if self.routing_chunks == 1 { "" } else { "s" },
            self.attention_keys,
            if self.attention_keys == 1 { "" } else { "s" },
            self.attention_words,
            if self.attention_words == 1 { "" } else { "s" },
            if self.subgroups {
                "subgroup"
            } else {
                "workgroup-memory"
            },
        )
    }
}

impl DeviceOptions {
    /// Options from the environment: `WGPU_ADAPTER_NAME` selects the adapter.
    pub fn from_env() -> Self {
        DeviceOptions {
            adapter: std::env::var("WGPU_ADAPTER_NAME")
                .ok()
                .filter(|name| !name.trim().is_empty()),
            index: None,
            max_binding_bytes: None,
            max_buffer_bytes: None,
            variants: None,
        }
    }
}

/// What the opened device can do, as detected.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// `shader-f16` is available (enabled on the device).
    pub shader_f16: bool,
    /// Subgroup operations are available (enabled on the device), with the adapter's subgroup sizes.
    pub subgroups: bool,
    pub subgroup_sizes: (u32, u32),
    /// Invocations the reductions exchange values among in registers (`SUBGROUP` in common.wgsl):
    /// the smallest subgroup size where [`Variants::subgroups`] is on and the device has subgroups
    /// laid out as the kernels assume, else 1.
    pub subgroup_width: u32,
    /// Timestamp queries are available (enabled on the device).
    pub timestamps: bool,
    /// Largest storage-buffer binding the kernels use (the adapter limit, or a smaller cap).
    pub max_binding_bytes: u64,
    pub max_buffer_bytes: u64,
    pub max_workgroups_per_dimension: u32,
    pub storage_offset_alignment: u32,
    /// The kernel variants in use.
    pub variants: Variants,
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "f16 {}, subgroups {} ({}..={}, reductions exchange among {}), timestamps {}, \
             binding {} MiB, buffer {} MiB, {}",
            yes_no(self.shader_f16),
            yes_no(self.subgroups),
            self.subgroup_sizes.0,
            self.subgroup_sizes.1,
            self.subgroup_width,
            yes_no(self.timestamps),
            self.max_binding_bytes >> 20,
            self.max_buffer_bytes >> 20,
            self.variants,
        )
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Every adapter the environment exposes, best first: discrete GPUs, then integrated, virtual and CPU
/// adapters, native APIs before GL (for `msa devices` and [`DeviceOptions::index`]).
pub async fn list_adapters() -> Vec<wgpu::Adapter> {
    let mut adapters = instance().enumerate_adapters(wgpu::Backends::all()).await;
    adapters.sort_by_key(|a| rank(&a.get_info()));
    adapters
}

/// The adapters whose name contains `name` (case-insensitive; every adapter for `None`), best first:
/// the list [`DeviceOptions::index`] counts in.
pub async fn matching_adapters(name: Option<&str>) -> Vec<wgpu::Adapter> {
    let needle = name.map(str::to_lowercase);
    let mut adapters = list_adapters().await;
    if let Some(needle) = needle {
        adapters.retain(|a| a.get_info().name.to_lowercase().contains(&needle));
    }
    adapters
}

/// Lower is better: discrete before integrated before virtual before CPU; native APIs before GL.
fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let api = u8::from(info.backend == wgpu::Backend::Gl);
    (kind, api)
}

fn names(adapters: &[wgpu::Adapter]) -> String {
    adapters
        .iter()
        .map(|a| {
            let info = a.get_info();
            format!("{} ({:?})", info.name, info.backend)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Picks an adapter per `options`.
pub(crate) async fn select_adapter(options: &DeviceOptions) -> Result<wgpu::Adapter, WgpuError> {
    let adapters = list_adapters().await;
    if adapters.is_empty() {
        let backends = std::env::var("WGPU_BACKEND").unwrap_or_else(|_| "all compiled-in".into());
        return Err(WgpuError::NoAdapter {
            detail: format!("backends tried: {backends}"),
        });
    }
    let matching = matching_adapters(options.adapter.as_deref()).await;
    let index = options.index.unwrap_or(0);
    match matching.get(index) {
        Some(adapter) => Ok(adapter.clone()),
        None => Err(WgpuError::AdapterNotFound {
            wanted: match (&options.adapter, index) {
                (Some(name), 0) => name.clone(),
                (Some(name), i) => format!("{name} #{i}"),
                (None, i) => format!("adapter #{i}"),
            },
            available: names(&adapters),
        }),
    }
}

/// Opens a device on `adapter` with the adapter's limits and its optional features.
pub(crate) async fn open_device(
    adapter: &wgpu::Adapter,
    options: &DeviceOptions,
) -> Result<(wgpu::Device, wgpu::Queue, Capabilities), WgpuError> {
    let variants = options
        .variants
        .unwrap_or_else(|| Variants::for_adapter(&adapter.get_info()));
    variants
        .check()
        .map_err(|reason| WgpuError::RequestDevice {
            adapter: adapter.get_info().name,
            reason,
        })?;
    let wanted =
        wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
    let features = adapter.features() & wanted;
    let limits = adapter.limits();
    let info = adapter.get_info();
    let (device, queue) = adapter
        .request_device(&wgpu::DeviceDescriptor {
            label: Some("msa"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        })
        .await
        .map_err(|e| WgpuError::RequestDevice {
            adapter: info.name.clone(),
            reason: e.to_string(),
        })?;
    // Windows start on 16-byte words even where the adapter allows less (RADV: 4), so kernels can
    // read every window as vec4s (both are powers of two).
    let alignment = limits.min_storage_buffer_offset_alignment.max(16);
    let adapter_binding = limits.max_storage_buffer_binding_size;
    // Buffers are padded to whole 16-byte words, so a usable buffer size is a multiple of 16; and a
    // binding never spans more than one buffer.
    let buffer = options
        .max_buffer_bytes
        .map_or(limits.max_buffer_size, |cap| {
            cap.min(limits.max_buffer_size)
        })
        / 16
        * 16;
    let binding = options
        .max_binding_bytes
        .map_or(adapter_binding, |cap| cap.min(adapter_binding))
        .min(buffer);
    let subgroups = features.contains(wgpu::Features::SUBGROUP);
    // The smallest subgroup size, capped at a workgroup (64): every pipeline's subgroups hold whole
    // aligned runs of it. A size that is no power of two leaves the reductions alone; the backend
    // checks the layout before kernels use it.
    let subgroup_width = match info.subgroup_min_size.min(64) {
        width if variants.subgroups && subgroups && width > 1 && width.is_power_of_two() => width,
        _ => 1,
    };
    let capabilities = Capabilities {
        shader_f16: features.contains(wgpu::Features::SHADER_F16),
        subgroups,
        subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
        subgroup_width,
        timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
        // Windows start at aligned offsets, so the usable size is a multiple of the alignment.
        max_binding_bytes: binding / u64::from(alignment) * u64::from(alignment),
        max_buffer_bytes: buffer,
        max_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
        storage_offset_alignment: alignment,
        variants: Variants {
            subgroups: subgroup_width > 1,
            ..variants
        },
    };
    Ok((device, queue, capabilities))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browser_adapters_get_the_row_of_their_vendor() {
        let gpu = Variants::row(true);
        let cpu = Variants::row(false);
        for (vendor, architecture, row) in [
            ("nvidia", "ampere", gpu),
            ("apple", "metal-3", gpu),
            ("Intel", "gen-12lp", gpu),
            ("amd", "rdna-3", gpu),
            ("google", "swiftshader", cpu),
            ("", "", cpu),
            ("microsoft", "", cpu),
        ] {
            assert_eq!(
                Variants::for_web_adapter(vendor, architecture),
                row,
                "{vendor} {architecture}"
            );
        }
        assert_eq!(gpu.matmul_split, 64);
        assert!(gpu.matmul_tiles);
        assert_eq!(
            (
                cpu.matmul_split,
                cpu.decode_columns,
                cpu.routing_chunks,
                cpu.attention_keys,
                cpu.attention_words
            ),
            (1, 4, 8, 4, 2)
        );
    }
}
