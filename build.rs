//! Links Intel MKL statically when the `mkl` feature is on (the conv GEMMs then call
//! `cblas_sgemm`); compiles the CUDA kernels of src/ops/kernels/ to PTX when the `cuda` feature is on
//! (see [`cuda_kernels`]); does nothing otherwise.
//!
//! MKLROOT must point at a directory with lib/libmkl_{intel_lp64,sequential,core}.a, e.g. the PyPI
//! wheels `mkl-static` + `mkl-include` unpacked (scripts/mkl-toolchain.sh does that and prints the
//! export).

fn main() {
    cuda_kernels();
    println!("cargo:rerun-if-env-changed=MKLROOT");
    if std::env::var_os("CARGO_FEATURE_MKL").is_none() {
        return;
    }
    let Some(root) = std::env::var_os("MKLROOT") else {
        eprintln!("error: feature `mkl` needs MKLROOT (see scripts/mkl-toolchain.sh)");
        std::process::exit(1);
    };
    let lib = std::path::Path::new(&root).join("lib");
    let libs = ["libmkl_intel_lp64.a", "libmkl_sequential.a", "libmkl_core.a"];
    for l in libs {
        if !lib.join(l).is_file() {
            eprintln!("error: feature `mkl`: {} not found (MKLROOT={})", lib.join(l).display(), root.to_string_lossy());
            std::process::exit(1);
        }
    }
    // MKL's static libraries depend on each other in a cycle: one linker group.
    println!("cargo:rustc-link-arg=-Wl,--start-group");
    for l in libs {
        println!("cargo:rustc-link-arg={}", lib.join(l).display());
    }
    println!("cargo:rustc-link-arg=-Wl,--end-group");
    for l in ["pthread", "m", "dl"] {
        println!("cargo:rustc-link-arg=-l{l}");
    }
}

/// With the `cuda` feature: src/ops/kernels/*.cu -> $OUT_DIR/*.ptx with nvcc (`$NVCC`, else
/// `$CUDA_ROOT/bin/nvcc`, else `nvcc` on the PATH; scripts/cuda-toolchain.sh sets CUDA_ROOT and PATH),
/// for the virtual architecture compute_$CUDA_COMPUTE_CAP (default 80: bf16 needs sm_80, and the PTX
/// is JIT-compiled by the driver for newer GPUs). src/ops/bn_cuda.rs embeds the PTX.
fn cuda_kernels() {
    const KERNELS: [&str; 1] = ["batchnorm"];
    for k in KERNELS {
        println!("cargo:rerun-if-changed=src/ops/kernels/{k}.cu");
    }
    for v in ["NVCC", "CUDA_ROOT", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("CUDA_ROOT")
            .map(|r| std::path::Path::new(&r).join("bin").join("nvcc"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| "nvcc".into())
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").ok().map(|c| c.trim().replace('.', "")).unwrap_or_else(|| "80".into());
    if cap.is_empty() || !cap.chars().all(|c| c.is_ascii_digit()) {
        eprintln!("error: feature `cuda`: CUDA_COMPUTE_CAP must be a number such as 80 or 90, got {cap:?}");
        std::process::exit(1);
    }
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for k in KERNELS {
        let src = format!("src/ops/kernels/{k}.cu");
        let ptx = out_dir.join(format!("{k}.ptx"));
        let status = std::process::Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                eprintln!("error: feature `cuda`: {} --ptx {src} failed ({s})", nvcc.display());
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!(
                    "error: feature `cuda`: cannot run {} ({e}); set NVCC or CUDA_ROOT (scripts/cuda-toolchain.sh)",
                    nvcc.display()
                );
                std::process::exit(1);
            }
        }
    }
}
