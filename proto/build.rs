//! Compiles `proto/` with protox, a protobuf compiler in Rust, so no system `protoc` is needed.

use std::path::PathBuf;

const FILES: &[&str] = &[
    "messaging/v1/envelope.proto",
    "order/v1/order.proto",
    "inventory/v1/inventory.proto",
    "payment/v1/payment.proto",
    "saga/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(FILES, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept for server reflection, so grpcurl works with no proto files at hand.
    std::fs::write(
        out_dir.join("descriptors.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    let mut config = prost_build::Config::new();
    // `prost::Name` gives each payload its full name, which is the envelope's message type.
    config.enable_type_names();
    tonic_prost_build::configure().compile_fds_with_config(descriptors, config)?;
    Ok(())
}
