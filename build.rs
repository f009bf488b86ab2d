//! Links Intel MKL statically when the `mkl` feature is on (the conv GEMMs then call
//! `cblas_sgemm`); does nothing otherwise.
//!
//! MKLROOT must point at a directory with lib/libmkl_{intel_lp64,sequential,core}.a, e.g. the PyPI
//! wheels `mkl-static` + `mkl-include` unpacked (scripts/mkl-toolchain.sh does that and prints the
//! export).

fn main() {
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
