//! The guest image build is cached by the hash of its inputs: a second run is a visible hit.

use std::process::Command;
use vmm_tests::workspace_root;

fn build() -> String {
    let script = workspace_root().join("guest-images/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run guest-images/build.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "build.sh failed:\n{text}");
    text
}

#[test]
fn second_image_build_is_a_cache_hit() {
    // The first run builds whatever changed since the last build (usually nothing: the test
    // command builds the images before the tests).
    build();
    let text = build();
    assert!(
        text.contains("kernel cache hit"),
        "kernel was rebuilt:\n{text}"
    );
    assert!(
        text.contains("initramfs cache hit"),
        "initramfs was rebuilt:\n{text}"
    );
}
