//! A device nearly full, on msa-cuda-emulator with a small memory (`MSA_CUDA_EMULATOR_MEMORY`): a
//! context copied by `append_rows` still grows where it fits without the room for more rows it
//! would get otherwise. Runs only on the emulator, whose memory limit fills the device at a size a
//! test can afford; on a GPU it says so and returns.

use cudarc::driver::result::mem_get_info;
use msa_cuda::{CudaBackend, CudaOptions};
use msa_engine::{Backend, shapes};

const MEMORY: usize = 64 << 20;

#[test]
fn a_copied_context_on_cuda_grows_without_room_where_the_room_does_not_fit() {
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
    let context = gpu
        .upload(&vec![1.0; rows * width], &[rows, width])
        .unwrap();
    let template = context.clone();
    let row = gpu.upload(&vec![2.0; width], &[1, width]).unwrap();
    pollster::block_on(gpu.synchronize()).unwrap();

    // Fill the device until the copy fits exactly but not with its room.
    let exact = (rows + 1) * width * 4;
    let with_room = shapes::grown_rows(rows + 1) * width * 4;
    let (free, total) = mem_get_info().unwrap();
    assert_eq!(total, MEMORY);
    let ballast_elements = (free - exact - (with_room - exact) / 2) / 4;
    let ballast = gpu
        .upload(&vec![0.0; ballast_elements], &[ballast_elements])
        .unwrap();
    let (free, _) = mem_get_info().unwrap();
    assert!(exact <= free && free < with_room, "{free} bytes free");

    let grown = gpu.append_rows(context, &[&row]).unwrap();
    assert_eq!(gpu.shape(&grown), [rows + 1, width]);
    let values = pollster::block_on(gpu.read(&grown)).unwrap();
    assert!(values[..rows * width].iter().all(|&v| v == 1.0));
    assert!(values[rows * width..].iter().all(|&v| v == 2.0));
    assert_eq!(gpu.shape(&template), [rows, width]);
    drop(ballast);
}
