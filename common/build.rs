//! Generates the `ccc.v1` protocol code with a vendored protoc, so a fresh
//! machine needs no system install.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        std::path::PathBuf::from("../proto/ccc/v1/gateway.proto"),
        std::path::PathBuf::from("../proto/ccc/v1/admin.proto"),
    ];
    let includes = [
        std::path::PathBuf::from("../proto"),
        protoc_bin_vendored::include_path()?,
    ];
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // The RPC `Connect` would clash with the generated `connect(dst)` helper:
        // clients are built from a channel with `XClient::new(channel)`.
        .build_transport(false)
        .file_descriptor_set_path(out_dir.join("ccc_descriptor.bin"))
        .compile_with_config(config, &protos, &includes)?;
    for proto in protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    Ok(())
}
