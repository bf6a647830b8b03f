//! Generates the C header with cbindgen and the C# P/Invoke file with csbindgen. It is always written to `OUT_DIR` (a test
//! compares it with the checked-in `include/netswap.h`); the checked-in copy is
//! rewritten only when `NETSWAP_WRITE_HEADER=1`, so `cargo publish` and builds from a
//! read-only tree never write outside `OUT_DIR`.

use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("netswap.h");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=NETSWAP_WRITE_HEADER");
    let bindings = cbindgen::generate(&crate_dir).expect("cbindgen can read netswap-ffi");
    bindings.write_to_file(&out);
    let write = std::env::var_os("NETSWAP_WRITE_HEADER").is_some_and(|v| v == "1");
    if write {
        bindings.write_to_file(crate_dir.join("../include/netswap.h"));
    }

    // The C# P/Invoke declarations (internal; the public C# API is hand-written above
    // them). Options chosen so that both Mono's mcs and the .NET SDK compile the
    // output: no `nint`, delegates instead of function pointers.
    let cs = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("NativeMethods.g.cs");
    csharp_builder()
        .generate_csharp_file(&cs)
        .expect("csbindgen can read netswap-ffi");
    if write {
        csharp_builder()
            .generate_csharp_file(crate_dir.join("../bindings/csharp/src/NativeMethods.g.cs"))
            .expect("csbindgen can write the C# bindings");
    }
}

fn csharp_builder() -> csbindgen::Builder {
    csbindgen::Builder::default()
        .input_extern_file("src/lib.rs")
        .input_extern_file("src/calls.rs")
        .input_extern_file("src/mirror.rs")
        .csharp_dll_name("netswap")
        .csharp_namespace("Netswap.Native")
        .csharp_class_name("NativeMethods")
        .csharp_class_accessibility("internal")
        .csharp_use_nint_types(false)
        .csharp_use_function_pointer(false)
        .csharp_generate_const_filter(|name| name.starts_with("NETSWAP_"))
}
