//! Generates the C header with cbindgen. It is always written to `OUT_DIR` (a test
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
    if std::env::var_os("NETSWAP_WRITE_HEADER").is_some_and(|v| v == "1") {
        bindings.write_to_file(crate_dir.join("../include/netswap.h"));
    }
}
