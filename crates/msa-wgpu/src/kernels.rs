//! The kernel families (one `.wgsl` file each under `shaders/`) and the pipeline cache.
//!
//! Each family's source is the device's subgroup prelude (`shaders/subgroups.wgsl` or
//! `shaders/no_subgroups.wgsl`), `shaders/common.wgsl`, then the family file; a pipeline is specialised by
//! its entry point and its `override` constants (`SUBGROUP` among them, the same for a whole device), and
//! cached under exactly those inputs.

use std::collections::HashMap;
use std::sync::Mutex;

const COMMON: &str = include_str!("../../../shaders/common.wgsl");
const SUBGROUPS: &str = include_str!("../../../shaders/subgroups.wgsl");
const NO_SUBGROUPS: &str = include_str!("../../../shaders/no_subgroups.wgsl");

/// A kernel family: one WGSL file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Gather,
    Matmul,
    Norm,
    Rope,
    Elementwise,
    Pool,
    Attention,
    Routing,
    TopK,
    Probe,
    /// Compiled only on devices with `shader-f16`.
    ProbeF16,
    /// Compiled only on devices with subgroup operations.
    SubgroupLayout,
}

impl Family {
    pub const ALL: [Family; 12] = [
        Family::Gather,
        Family::Matmul,
        Family::Norm,
        Family::Rope,
        Family::Elementwise,
        Family::Pool,
        Family::Attention,
        Family::Routing,
        Family::TopK,
        Family::Probe,
        Family::ProbeF16,
        Family::SubgroupLayout,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            Family::Gather => "gather.wgsl",
            Family::Matmul => "matmul.wgsl",
            Family::Norm => "norm.wgsl",
            Family::Rope => "rope.wgsl",
            Family::Elementwise => "elementwise.wgsl",
            Family::Pool => "pool.wgsl",
            Family::Attention => "attention.wgsl",
            Family::Routing => "routing.wgsl",
            Family::TopK => "topk.wgsl",
            Family::Probe => "probe.wgsl",
            Family::ProbeF16 => "probe_f16.wgsl",
            Family::SubgroupLayout => "subgroup_layout.wgsl",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Family::Gather => include_str!("../../../shaders/gather.wgsl"),
            Family::Matmul => include_str!("../../../shaders/matmul.wgsl"),
            Family::Norm => include_str!("../../../shaders/norm.wgsl"),
            Family::Rope => include_str!("../../../shaders/rope.wgsl"),
            Family::Elementwise => include_str!("../../../shaders/elementwise.wgsl"),
            Family::Pool => include_str!("../../../shaders/pool.wgsl"),
            Family::Attention => include_str!("../../../shaders/attention.wgsl"),
            Family::Routing => include_str!("../../../shaders/routing.wgsl"),
            Family::TopK => include_str!("../../../shaders/topk.wgsl"),
            Family::Probe => include_str!("../../../shaders/probe.wgsl"),
            Family::ProbeF16 => include_str!("../../../shaders/probe_f16.wgsl"),
            Family::SubgroupLayout => include_str!("../../../shaders/subgroup_layout.wgsl"),
        }
    }

    /// Whether the family uses f16 arithmetic (the `shader-f16` feature).
    pub fn needs_f16(self) -> bool {
        self == Family::ProbeF16
    }

    /// Whether the family uses subgroup built-ins itself (not only through the prelude).
    pub fn needs_subgroups(self) -> bool {
        self == Family::SubgroupLayout
    }

    /// The complete WGSL the device compiles: the extensions it enables, the subgroup prelude (the
    /// register exchange with `subgroups`, its stand-in without), the shared helpers, then the family.
    pub fn source(self, subgroups: bool) -> String {
        // Subgroups need no `enable` (naga refuses `enable subgroups;` and takes the device feature);
        // only native devices have them: wgpu's WebGPU backend reports none in a browser.
        let enables = if self.needs_f16() {
            "enable f16;\n"
        } else {
            ""
        };
        let prelude = if subgroups { SUBGROUPS } else { NO_SUBGROUPS };
        format!("{enables}{prelude}\n{COMMON}\n{}", self.body())
    }
}

/// One pipeline: a family's entry point with its `override` constants.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub family: Family,
    pub entry: &'static str,
    pub constants: Vec<(&'static str, f64)>,
}

impl Kernel {
    pub fn new(family: Family, entry: &'static str) -> Self {
        Kernel {
            family,
            entry,
            constants: Vec::new(),
        }
    }

    pub fn with(mut self, name: &'static str, value: u32) -> Self {
        self.constants.push((name, f64::from(value)));
        self
    }

    fn key(&self) -> (Family, &'static str, Vec<(&'static str, u64)>) {
        let constants = self
            .constants
            .iter()
            .map(|&(name, value)| (name, value.to_bits()))
            .collect();
        (self.family, self.entry, constants)
    }
}

type PipelineKey = (Family, &'static str, Vec<(&'static str, u64)>);

/// Shader modules and compute pipelines, created on first use.
#[derive(Default)]
pub struct PipelineCache {
    modules: Mutex<HashMap<(Family, bool), wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
}

impl PipelineCache {
    /// The pipeline of `kernel` with `SUBGROUP = subgroup` (see common.wgsl), compiled with the subgroup
    /// prelude where that is above 1 (1 is the default: there the pipeline's constants are the
    /// kernel's own).
    pub fn get(
        &self,
        device: &wgpu::Device,
        kernel: &Kernel,
        subgroup: u32,
    ) -> wgpu::ComputePipeline {
        let subgroups = subgroup > 1;
        let mut key = kernel.key();
        if subgroups {
            key.2.push(("SUBGROUP", f64::from(subgroup).to_bits()));
        }
        if let Some(pipeline) = self.pipelines.lock().expect("cache lock").get(&key) {
            return pipeline.clone();
        }
        // A miss (once per pipeline): the kernel's constants with SUBGROUP.
        let mut kernel = kernel.clone();
        if subgroups {
            kernel = kernel.with("SUBGROUP", subgroup);
        }
        let module = self
            .modules
            .lock()
            .expect("cache lock")
            .entry((kernel.family, subgroups))
            .or_insert_with(|| {
                device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(kernel.family.file_name()),
                    source: wgpu::ShaderSource::Wgsl(kernel.family.source(subgroups).into()),
                })
            })
            .clone();
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(kernel.entry),
            layout: None,
            module: &module,
            entry_point: Some(kernel.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &kernel.constants,
                // matmul writes its workgroup memory before reading it; zero-filling it would cost
                // every workgroup a pass and a barrier, also where SPLIT is 1 and it goes unused.
                zero_initialize_workgroup_memory: kernel.family != Family::Matmul,
            },
            cache: None,
        });
        self.pipelines
            .lock()
            .expect("cache lock")
            .insert(key, pipeline.clone());
        pipeline
    }
}
