//! The Docker build context: what the Dockerfile's builder stage copies is
//! let through by .dockerignore, and is enough for Cargo to build the
//! `postbox` binary (checked offline in a copy of exactly those files, since
//! a Docker daemon is not always at hand; scripts/compose-smoke.sh runs the
//! real image where one is).

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The sources of the builder stage's `COPY` lines (not `COPY --from`).
fn copied_paths() -> Vec<String> {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|rest| !rest.starts_with("--"))
        .flat_map(|rest| {
            let words: Vec<&str> = rest.split_whitespace().collect();
            words[..words.len() - 1]
                .iter()
                .map(|w| w.trim_end_matches('/').to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

#[test]
fn dockerignore_lets_through_what_the_build_copies() {
    let ignore = std::fs::read_to_string(Path::new(ROOT).join(".dockerignore")).unwrap();
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .map(|p| p.trim_end_matches('/'))
        .collect();
    assert!(ignore.lines().any(|l| l.trim() == "*"), "everything else stays out");
    let copied = copied_paths();
    assert!(copied.contains(&"src".to_owned()) && copied.contains(&"migrations".to_owned()));
    for path in &copied {
        assert!(
            allowed.contains(&path.as_str()),
            "{path} is copied but .dockerignore keeps it out"
        );
    }
}

#[test]
fn the_copied_files_are_a_buildable_workspace() {
    let dir: PathBuf = std::env::temp_dir().join(format!("postbox-docker-context-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for path in copied_paths() {
        copy_tree(&Path::new(ROOT).join(&path), &dir.join(&path));
    }
    // `cargo metadata` reads the manifest of every locked package, for
    // every platform; a test build downloads only the host's. Fetch the
    // rest into the local cache first (a no-op once they are there).
    let fetched = Command::new(env!("CARGO"))
        .args(["fetch", "--locked"])
        .current_dir(ROOT)
        .output()
        .unwrap();
    assert!(
        fetched.status.success(),
        "cargo fetch: {}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    // What `cargo build --locked --bin postbox` reads first: every manifest
    // of the workspace and the lock file, resolvable without the network.
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .current_dir(&dir)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        out.status.success(),
        "cargo cannot read the Docker build context: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let has_bin = meta["packages"].as_array().unwrap().iter().any(|p| {
        p["name"] == "postbox"
            && p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["name"] == "postbox" && t["kind"][0] == "bin")
    });
    assert!(has_bin, "the context has the postbox binary target");
}
