//! The vendored generated code (`src/gen/walcast.v1.rs`) and the current
//! descriptor set (`proto/walcast/v1/envelope.binpb`) are what the `.proto`
//! compiles to today. Regenerate both with
//! `WALCAST_REGENERATE=1 cargo test -p walcast-envelope --test generated`.
//!
//! Why vendored: compiling `protox` (the pure-Rust protobuf compiler) costs
//! more than the rest of this crate; vendoring keeps it out of every build of
//! walcast (and of the container image) and needs it only for this test.

use std::path::{Path, PathBuf};

use prost::Message;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn regenerate() -> bool {
    std::env::var_os("WALCAST_REGENERATE").is_some_and(|v| v == "1")
}

/// The descriptor set of walcast/v1/envelope.proto, without source info
/// (comments do not change the wire format).
fn descriptor_set(source_info: bool) -> prost_types::FileDescriptorSet {
    let mut compiler = protox::Compiler::new([repo().join("proto")]).unwrap();
    compiler.include_source_info(source_info);
    compiler.include_imports(true);
    compiler.open_file("walcast/v1/envelope.proto").unwrap();
    compiler.file_descriptor_set()
}

fn check_or_write(path: &Path, fresh: &[u8]) {
    if regenerate() {
        std::fs::write(path, fresh).unwrap();
        return;
    }
    let vendored = std::fs::read(path).unwrap_or_default();
    assert!(
        vendored == fresh,
        "{} is stale: proto/walcast/v1/envelope.proto changed. Regenerate with \
         `WALCAST_REGENERATE=1 cargo test -p walcast-envelope --test generated` \
         and commit the result",
        path.display()
    );
}

#[test]
fn vendored_rust_code_matches_the_proto() {
    let out = tempfile_dir();
    prost_build::Config::new()
        .out_dir(&out)
        .compile_fds(descriptor_set(true))
        .unwrap();
    let fresh = std::fs::read(out.join("walcast.v1.rs")).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    check_or_write(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gen/walcast.v1.rs"),
        &fresh,
    );
}

#[test]
fn committed_descriptor_set_matches_the_proto() {
    let fresh = descriptor_set(false).encode_to_vec();
    check_or_write(&repo().join("proto/walcast/v1/envelope.binpb"), &fresh);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "walcast-envelope-gen-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
