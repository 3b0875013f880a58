//! Every wgpu kernel against the CPU reference: the backend-generic checks of
//! `msa_engine::conformance` (odd sizes, every weight dtype, explicit tolerances), then what only wgpu
//! has: weights split over buffers and binding windows, fused-op dispatch counts, workgroup grid tiling,
//! recording and submits, adapter selection, buffer limits and device loss. Runs on whatever adapter the
//! environment offers (lavapipe in CI); with `CI` set, a missing adapter fails the test instead of
//! skipping it.

use msa_core::{ChunkReduce, DType, HeadReduce, QueryReduce, ScoreMode, TensorView};
use msa_engine::conformance::{
    self, DTYPES, Tolerances, assert_close, key_weights, random, random_offsets, weight_bytes,
    weight_pair,
};
use msa_engine::{Backend, CpuBackend, RoutingSpec};
use msa_wgpu::{DeviceOptions, Variants, WgpuBackend};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// f32 arithmetic in another order: relative to the magnitude of the values compared.
const TOL: f32 = Tolerances::EXACT_F32.f32_math;

fn gpu_with(options: DeviceOptions) -> Option<WgpuBackend> {
    pollster::block_on(WgpuBackend::open_or_skip(options))
}

fn gpu() -> Option<WgpuBackend> {
    gpu_with(DeviceOptions::from_env())
}

#[test]
fn embedding_and_gather_rows_match() {
    let Some(gpu) = gpu() else { return };
    conformance::check_embedding_and_gather_rows(&gpu, &Tolerances::EXACT_F32);
}

/// Weights written in pieces (fetched memory pages).
#[test]
fn weights_written_in_pieces_match() {
    let Some(gpu) = gpu() else { return };
    conformance::check_weights_from_pieces(&gpu, &Tolerances::EXACT_F32);
}

#[test]
fn matmul_matches_for_every_dtype_and_odd_sizes() {
    let Some(gpu) = gpu() else { return };
    conformance::check_matmul(&gpu, &Tolerances::EXACT_F32);
}

/// Kernel variants the adapter table can choose, whatever this adapter would get, against the CPU
/// reference: the GPU row (projection tiles shared by 64 invocations and reduced in registers and
/// workgroup memory, one decode column per tile, one routing chunk, attention key and output word per
/// invocation) and odd ones (32 invocations: two tiles per workgroup; 3 decode columns; 2 routing
/// chunks; 2 attention keys and 2 output words; reductions in workgroup memory only; and 8 invocations
/// per tile, which reduce in registers alone where subgroups have 8 lanes or more); projections also
/// with weights split into buffers and windows. The CPU row, with subgroup reductions where the adapter
/// has them (lavapipe: 8 lanes), is what every other test runs.
#[test]
fn every_kernel_variant_matches() {
    let rows = [
        Variants {
            matmul_split: 64,
            matmul_tiles: true,
            decode_columns: 1,
            routing_chunks: 1,
            attention_keys: 1,
            attention_words: 1,
            subgroups: true,
        },
        Variants {
            matmul_split: 32,
            matmul_tiles: false,
            decode_columns: 3,
            routing_chunks: 2,
            attention_keys: 2,
            attention_words: 2,
            subgroups: false,
        },
        // A split no wider than lavapipe's subgroups: tiles reduce in registers alone.
        Variants {
            matmul_split: 8,
            matmul_tiles: false,
            decode_columns: 2,
            routing_chunks: 4,
            attention_keys: 4,
            attention_words: 1,
            subgroups: true,
        },
    ];
    for chosen in rows {
        let variants = Some(chosen);
        let Some(gpu) = gpu_with(DeviceOptions {
            variants,
            ..DeviceOptions::from_env()
        }) else {
            return;
        };
        let caps = gpu.capabilities();
        // Subgroup reductions stay on only where the device has subgroups laid out as they need.
        let expected = Variants {
            subgroups: chosen.subgroups && caps.subgroup_width > 1,
            ..chosen
        };
        assert_eq!(caps.variants, expected);
        // lavapipe (CI) has them, 8 lanes: the subgroup path is what these rows test there.
        if gpu.adapter_info().name.contains("llvmpipe") {
            assert_eq!(
                caps.subgroup_width,
                if chosen.subgroups { 8 } else { 1 },
                "{caps}"
            );
        }
        conformance::check_matmul(&gpu, &Tolerances::EXACT_F32);
        conformance::check_norms(&gpu, &Tolerances::EXACT_F32);
        conformance::check_top_k(&gpu, &Tolerances::EXACT_F32);
        conformance::check_fused_ops(&gpu, &Tolerances::EXACT_F32);
        conformance::check_routing_scores(&gpu, &Tolerances::EXACT_F32);
        conformance::check_attention(&gpu, &Tolerances::EXACT_F32);
        let small = gpu_with(DeviceOptions {
            max_binding_bytes: Some(4096),
            max_buffer_bytes: Some(8192),
            variants,
            ..DeviceOptions::from_env()
        })
        .expect("the adapter opened once");
        conformance::check_fused_projections(&small, &Tolerances::EXACT_F32);
    }
    // Variants the kernels cannot take are refused when the device opens.
    let table = Variants {
        matmul_split: 1,
        matmul_tiles: false,
        decode_columns: 4,
        routing_chunks: 8,
        attention_keys: 4,
        attention_words: 2,
        subgroups: true,
    };
    for (variants, message) in [
        (
            Variants {
                matmul_split: 48,
                ..table
            },
            "power of two from 1 to 64",
        ),
        (
            Variants {
                decode_columns: 5,
                ..table
            },
            "decode columns per tile must be from 1 to 4",
        ),
        (
            Variants {
                routing_chunks: 3,
                ..table
            },
            "power of two from 1 to 8",
        ),
        (
            Variants {
                attention_keys: 3,
                ..table
            },
            "attention keys per invocation must be 1, 2 or 4",
        ),
        (
            Variants {
                attention_words: 4,
                ..table
            },
            "attention words per invocation must be 1 or 2",
        ),
    ] {
        let refused = pollster::block_on(WgpuBackend::new(DeviceOptions {
            variants: Some(variants),
            ..DeviceOptions::from_env()
        }));
        match refused {
            Err(e) => assert!(e.to_string().contains(message), "{e}"),
            Ok(_) => panic!("{variants:?} was accepted"),
        }
    }
}

/// The fused ops against the CPU reference's unfused ops; the projections also on a device whose limits
/// split the weights into buffers and windows; each fused op is one dispatch.
#[test]
fn fused_ops_match_the_unfused_reference() {
    let Some(gpu) = gpu() else { return };
    conformance::check_fused_ops(&gpu, &Tolerances::EXACT_F32);
    let small = gpu_with(DeviceOptions {
        max_binding_bytes: Some(4096),
        max_buffer_bytes: Some(8192),
        ..DeviceOptions::from_env()
    })
    .expect("the adapter opened once");
    conformance::check_fused_projections(&small, &Tolerances::EXACT_F32);
    // Each fused op is one dispatch (on the full device, where nothing is windowed).
    let cpu = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(12);
    let x = gpu.upload(&random(&mut rng, 2 * 45), &[2, 45]).unwrap();
    let (gw, _) = weight_pair(&gpu, &cpu, &mut rng, &[37, 45], DType::BF16);
    let (gu, _) = weight_pair(&gpu, &cpu, &mut rng, &[37, 45], DType::BF16);
    let (gn, _) = weight_pair(&gpu, &cpu, &mut rng, &[45], DType::BF16);
    let residual = gpu.upload(&random(&mut rng, 2 * 37), &[2, 37]).unwrap();
    let before = gpu.stats();
    gpu.matmul_add(&x, &gw, &residual).unwrap();
    gpu.norm_swiglu(&x, &gn, 1e-6, &gw, &gu).unwrap();
    let heads = gpu
        .upload(&random(&mut rng, 2 * 3 * 16), &[2, 3, 16])
        .unwrap();
    let (gq, _) = weight_pair(&gpu, &cpu, &mut rng, &[16], DType::BF16);
    gpu.norm_rope(&heads, &gq, 1e-6, &[4, 9], 1e6).unwrap();
    gpu.norm_matmul(&x, &gn, 1e-6, &gw).unwrap();
    assert_eq!((gpu.stats() - before).dispatches, 4);
}

#[test]
fn rms_norm_per_row_and_per_head_and_l2_normalize_match() {
    let Some(gpu) = gpu() else { return };
    conformance::check_norms(&gpu, &Tolerances::EXACT_F32);
}

#[test]
fn rope_matches_with_document_local_and_global_positions() {
    let Some(gpu) = gpu() else { return };
    conformance::check_rope(&gpu, &Tolerances::EXACT_F32);
}

/// Few query rows × heads (under 256) over more than 256 keys, as in decode, take the split-KV kernel.
#[test]
fn attention_prefill_and_split_kv_decode_match() {
    let Some(gpu) = gpu() else { return };
    conformance::check_attention(&gpu, &Tolerances::EXACT_F32);
}

#[test]
fn elementwise_rows_and_pooling_match() {
    let Some(gpu) = gpu() else { return };
    conformance::check_elementwise_rows_and_pooling(&gpu, &Tolerances::EXACT_F32);
}

#[test]
fn appended_rows_match() {
    let Some(gpu) = gpu() else { return };
    conformance::check_append_rows(&gpu, &Tolerances::EXACT_F32);
}

/// A context held alone grows by copying its new rows only (by the backend's copy count).
#[test]
fn appended_rows_copy_only_what_they_must() {
    let Some(gpu) = gpu() else { return };
    conformance::check_append_copies(&gpu, || gpu.stats().copied_bytes);
}

#[test]
fn routing_scores_match_for_every_reduction_and_score_mode() {
    let Some(gpu) = gpu() else { return };
    conformance::check_routing_scores(&gpu, &Tolerances::EXACT_F32);
}

/// Up to k = 256 the selection runs on the device; past it, on the host.
#[test]
fn top_k_selects_like_the_reference_with_ties_nan_and_signed_zero() {
    let Some(gpu) = gpu() else { return };
    conformance::check_top_k(&gpu, &Tolerances::EXACT_F32);
}

#[test]
fn both_backends_refuse_the_same_malformed_inputs() {
    let Some(gpu) = gpu() else { return };
    conformance::check_malformed_inputs(&gpu, &Tolerances::EXACT_F32);
}

#[test]
fn tensors_larger_than_the_binding_and_buffer_limits_are_split() {
    // A 4 KiB binding cap makes every weight below span several windows; an 8 KiB buffer cap splits
    // the weights into several buffers of whole rows.
    let Some(small) = gpu_with(DeviceOptions {
        max_binding_bytes: Some(4096),
        max_buffer_bytes: Some(8192),
        ..DeviceOptions::from_env()
    }) else {
        return;
    };
    assert_eq!(small.capabilities().max_binding_bytes, 4096);
    assert_eq!(small.capabilities().max_buffer_bytes, 8192);
    let cpu = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(9);
    for dtype in DTYPES {
        let (rows, width) = (301, 45);
        let values = random(&mut rng, rows * width);
        let bytes = weight_bytes(&values, dtype);
        let shape = [rows, width];
        let view = TensorView {
            name: "big",
            dtype,
            shape: &shape,
            bytes: &bytes,
        };
        let (gw, cw) = (
            small.upload_weight(view).unwrap(),
            cpu.upload_weight(view).unwrap(),
        );
        assert!(
            gw.buffers() >= bytes.len() / 8192,
            "{dtype}: {} buffers",
            gw.buffers()
        );
        let ids: Vec<u32> = (0..20).map(|_| rng.random_range(0..rows as u32)).collect();
        let g = pollster::block_on(small.read(&small.embedding(&gw, &ids).unwrap())).unwrap();
        let c = pollster::block_on(cpu.read(&cpu.embedding(&cw, &ids).unwrap())).unwrap();
        assert_close(&format!("windowed embedding {dtype}"), &g, &c, 0.0);
        let x = random(&mut rng, 3 * width);
        let g = small
            .matmul(&small.upload(&x, &[3, width]).unwrap(), &gw)
            .unwrap();
        let c = cpu
            .matmul(&cpu.upload(&x, &[3, width]).unwrap(), &cw)
            .unwrap();
        let g = pollster::block_on(small.read(&g)).unwrap();
        let c = pollster::block_on(cpu.read(&c)).unwrap();
        assert_close(&format!("windowed matmul {dtype}"), &g, &c, TOL);
    }
    // Routing keys of ~150 chunks × 2 heads × 16 dims (19 KiB as f32) against a 4 KiB binding, in every
    // stored dtype; with one KV head of 33 dims, packed windows start at odd elements. Stored bf16/f16
    // keys (a bank's) are split into buffers too; f32 keys are a memory's own tensor, which must fit
    // one buffer, so they run with the binding cap alone.
    let windowed = gpu_with(DeviceOptions {
        max_binding_bytes: Some(4096),
        ..DeviceOptions::from_env()
    })
    .expect("the adapter opened once");
    let spec = RoutingSpec {
        score_mode: ScoreMode::ScaledDot,
        head_reduce: HeadReduce::Mean,
        query_reduce: QueryReduce::Max,
        chunk_reduce: ChunkReduce::Max,
    };
    for dtype in DTYPES {
        for (heads, kv_heads, d) in [(4, 2, 16), (2, 1, 33)] {
            let offsets = random_offsets(&mut rng, 40, 7);
            let chunks = *offsets.last().unwrap() as usize;
            let k = random(&mut rng, chunks * kv_heads * d);
            let q = random(&mut rng, 2 * heads * d);
            let gpu = if dtype == DType::F32 {
                &windowed
            } else {
                &small
            };
            let (gk, ck) = key_weights(gpu, &cpu, &k, &[chunks, kv_heads, d], dtype);
            let g = gpu
                .routing_scores(
                    &gpu.upload(&q, &[2, heads, d]).unwrap(),
                    &[0, 1],
                    &gk,
                    &offsets,
                    spec,
                )
                .unwrap();
            let c = cpu
                .routing_scores(
                    &cpu.upload(&q, &[2, heads, d]).unwrap(),
                    &[0, 1],
                    &ck,
                    &offsets,
                    spec,
                )
                .unwrap();
            assert_close(
                &format!("windowed routing {dtype} keys h{heads}/{kv_heads} d{d}"),
                &pollster::block_on(gpu.read(&g)).unwrap(),
                &pollster::block_on(cpu.read(&c)).unwrap(),
                TOL,
            );
        }
    }
    // Activations are bound whole: one larger than the cap is a clear error, not a wrong answer, and
    // the device stays usable (nothing reached wgpu's validation).
    let big = small.upload(&vec![1.0; 2048], &[2048]).unwrap();
    let err = small.add(&big, &big).unwrap_err().to_string();
    assert!(err.contains("storage binding limit"), "{err}");
    let rows = small.upload(&vec![1.0; 64], &[4, 16]).unwrap();
    let err = small.gather_rows(&rows, &[0; 80]).unwrap_err().to_string();
    assert!(err.contains("storage binding limit"), "{err}");
    let sum = small.add(&rows, &rows).unwrap();
    assert_eq!(pollster::block_on(small.read(&sum)).unwrap(), vec![2.0; 64]);
}

#[test]
fn a_weight_whose_row_cannot_be_bound_is_refused_naming_the_limit() {
    let Some(small) = gpu_with(DeviceOptions {
        max_binding_bytes: Some(4096),
        ..DeviceOptions::from_env()
    }) else {
        return;
    };
    // 2,000 f32 per row: 8,000 bytes, past a 4 KiB binding.
    let bytes = vec![0u8; 3 * 2000 * 4];
    let shape = [3, 2000];
    let err = small
        .upload_weight(TensorView {
            name: "model.embed_tokens.weight",
            dtype: DType::F32,
            shape: &shape,
            bytes: &bytes,
        })
        .unwrap_err()
        .to_string();
    for part in [
        "exceeds this device's buffer limits",
        "model.embed_tokens.weight",
        "8000 bytes",
        "maxStorageBufferBindingSize 4096",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
}

#[test]
fn grids_past_65535_workgroups_are_tiled() {
    let Some(gpu) = gpu() else { return };
    // 70,000 workgroups of 64 invocations.
    let n = 70_000 * 64 + 5;
    let a: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let t = gpu.upload(&a, &[n]).unwrap();
    let sum = pollster::block_on(gpu.read(&gpu.add(&t, &t).unwrap())).unwrap();
    assert!(sum.iter().zip(&a).all(|(s, a)| *s == 2.0 * a));
}

#[test]
fn ops_record_into_one_submit_until_a_readback() {
    let Some(gpu) = gpu() else { return };
    let x = gpu.upload(&[1.0; 64], &[4, 16]).unwrap();
    let before = gpu.stats();
    let mut y = x.clone();
    for _ in 0..10 {
        y = gpu.add(&y, &x).unwrap();
    }
    let after_ops = gpu.stats() - before;
    assert_eq!((after_ops.dispatches, after_ops.submits), (10, 0));
    let values = pollster::block_on(gpu.read(&y)).unwrap();
    assert_eq!(values, vec![11.0; 64]);
    let after_read = gpu.stats() - before;
    assert_eq!((after_read.submits, after_read.readbacks), (1, 1));
}

#[test]
fn an_unknown_adapter_name_lists_the_adapters_found() {
    let Some(gpu) = gpu() else { return };
    let options = DeviceOptions {
        adapter: Some("no-such-gpu-anywhere".into()),
        ..DeviceOptions::default()
    };
    let error = match pollster::block_on(WgpuBackend::new(options)) {
        Ok(_) => panic!("matched a made-up adapter name"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("no-such-gpu-anywhere"), "{error}");
    assert!(error.contains(&gpu.adapter_info().name), "{error}");
    // Picking by part of the real name, in any case, opens that adapter.
    let part: String = gpu.adapter_info().name.chars().take(4).collect();
    let named = gpu_with(DeviceOptions {
        adapter: Some(part.to_uppercase()),
        ..DeviceOptions::default()
    })
    .expect("the named adapter opens");
    assert_eq!(named.adapter_info().name, gpu.adapter_info().name);
    // So does the first adapter by index, and an index past the last one is refused with the list.
    let first = gpu_with(DeviceOptions {
        index: Some(0),
        ..DeviceOptions::default()
    })
    .expect("adapter #0 opens");
    assert_eq!(first.adapter_info().name, gpu.adapter_info().name);
    let error = match pollster::block_on(WgpuBackend::new(DeviceOptions {
        index: Some(99),
        ..DeviceOptions::default()
    })) {
        Ok(_) => panic!("opened adapter #99"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("adapter #99"), "{error}");
    assert!(error.contains(&gpu.adapter_info().name), "{error}");
}

#[test]
fn a_tensor_past_the_largest_buffer_is_refused_before_allocation() {
    let Some(gpu) = gpu() else { return };
    // Concatenating one 1 MiB tensor with itself until the result passes the adapter's buffer limit.
    let part = gpu.upload(&vec![0.5; 1 << 18], &[1 << 18]).unwrap();
    let copies = (gpu.capabilities().max_buffer_bytes >> 20) as usize + 1;
    let err = gpu
        .concat_rows(&vec![&part; copies])
        .unwrap_err()
        .to_string();
    assert!(err.contains("exceed the largest buffer"), "{err}");
    // The device is still usable afterwards.
    assert_eq!(
        pollster::block_on(gpu.read(&gpu.add(&part, &part).unwrap())).unwrap()[0],
        1.0
    );
}

#[test]
fn a_destroyed_device_is_reported_lost_by_every_later_op() {
    let Some(gpu) = gpu() else { return };
    let x = gpu.upload(&[1.0; 64], &[4, 16]).unwrap();
    let sum = gpu.add(&x, &x).unwrap();
    let pending = gpu.read(&sum);
    gpu.destroy();
    // Work recorded before the loss fails rather than returning garbage or hanging.
    let lost = |result: msa_engine::Result<Vec<f32>>| match result {
        Err(e @ msa_engine::Error::DeviceLost { .. }) => e.to_string(),
        other => panic!("expected DeviceLost, got {other:?}"),
    };
    let before = lost(pollster::block_on(pending));
    assert!(before.contains("device was lost"), "{before}");
    // So does every later op, with wgpu's reason (the device was destroyed).
    let after = match gpu.add(&x, &x) {
        Ok(y) => lost(pollster::block_on(gpu.read(&y))),
        Err(e) => e.to_string(),
    };
    assert!(after.contains("device was lost"), "{after}");
    assert!(after.to_lowercase().contains("destroy"), "{after}");
}
