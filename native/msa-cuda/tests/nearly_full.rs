//! A device nearly full, on msa-cuda-emulator with a small memory (`MSA_CUDA_EMULATOR_MEMORY`): a
//! context copied by `append_rows` still grows where it fits without the room for more rows it
//! would get otherwise, with what room fits. Runs only on the emulator, whose memory limit fills
//! the device at a size a test can afford (and counts exact bytes); on a GPU it says so and returns.

use cudarc::driver::result::mem_get_info;
use msa_cuda::{CudaBackend, CudaOptions};
use msa_engine::{Backend, shapes};

const MEMORY: usize = 64 << 20;

#[test]
fn a_copied_context_on_cuda_grows_with_the_room_that_fits() {
    // SAFETY: set before any CUDA call, by this binary's only test.
    unsafe { std::env::set_var("MSA_CUDA_EMULATOR_MEMORY", MEMORY.to_string()) };
    let Some(gpu) = CudaBackend::open_or_skip(CudaOptions::default()) else {
        return;
    };
    if !gpu.describe().contains("msa-cuda-emulator") {
        eprintln!("skipping: {} is not the emulator", gpu.describe());
        return;
    }
    // An 8 MiB context shared with another view (a template), so appending copies it.
    let (rows, width) = (2048, 1024);
    let row_bytes = width * 4;
    let context = gpu
        .upload(&vec![1.0; rows * width], &[rows, width])
        .unwrap();
    let row = gpu.upload(&vec![2.0; width], &[1, width]).unwrap();
    let free = || {
        pollster::block_on(gpu.synchronize()).unwrap();
        mem_get_info().unwrap().0
    };
    let ballast = |rows: usize| {
        gpu.upload(&vec![0.0; rows * width], &[rows, width])
            .unwrap()
    };
    let grown_rows = rows + 1;
    assert!(shapes::grown_rows(grown_rows) >= grown_rows + 128);

    // Free memory for the copy and 128 rows more: not for an eighth more, but for 64 rows more.
    let kept = ballast(free() / row_bytes - grown_rows - 128);
    let before = free();
    let grown = gpu.append_rows(context.clone(), &[&row]).unwrap();
    assert_eq!(
        (before - free()) / row_bytes,
        grown_rows + shapes::SPARE_ROWS,
        "rows allocated with 128 rows free past the copy"
    );
    check(&gpu, &grown, rows);
    drop(grown);

    // Free memory for the copy and 32 rows more: no room at all.
    let more = ballast(free() / row_bytes - grown_rows - 32);
    let before = free();
    let grown = gpu.append_rows(context.clone(), &[&row]).unwrap();
    assert_eq!(
        (before - free()) / row_bytes,
        grown_rows,
        "rows allocated with 32 rows free past the copy"
    );
    check(&gpu, &grown, rows);
    assert_eq!(gpu.shape(&context), [rows, width]);
    drop((kept, more));
}

/// `grown` is the shared context's rows of ones, then the appended row of twos.
fn check(gpu: &CudaBackend, grown: &msa_cuda::CudaTensor, rows: usize) {
    let width = gpu.shape(grown)[1];
    assert_eq!(gpu.shape(grown), [rows + 1, width]);
    let values = pollster::block_on(gpu.read(grown)).unwrap();
    assert!(values[..rows * width].iter().all(|&v| v == 1.0));
    assert!(values[rows * width..].iter().all(|&v| v == 2.0));
}
