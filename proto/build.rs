//! Compiles `proto/tether.proto` with protox (pure Rust, no system `protoc`) and prost.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/tether.proto";
    println!("cargo:rerun-if-changed={file}");
    let descriptors = protox::compile([file], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
