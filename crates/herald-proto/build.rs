//! Compiles `proto/herald/v1/*.proto`. Uses `PROTOC` when set, else the
//! vendored protoc, so a fresh machine needs no system protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    // The directory too, so that a newly added .proto file is compiled.
    println!("cargo:rerun-if-changed={}", root.join("herald/v1").display());
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root.join("herald/v1"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "proto") {
            println!("cargo:rerun-if-changed={}", path.display());
            files.push(path);
        }
    }
    files.sort();
    println!("cargo:rerun-if-env-changed=PROTOC");

    let mut config = tonic_prost_build::Config::new();
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    config.protoc_executable(protoc);
    config.bytes(["."]);
    let descriptors = PathBuf::from(std::env::var("OUT_DIR")?).join("herald_descriptor.bin");
    tonic_prost_build::configure().file_descriptor_set_path(descriptors).compile_with_config(
        config,
        &files,
        &[root],
    )?;
    Ok(())
}
