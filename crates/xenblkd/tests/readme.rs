//! The README's set-up block, run as a newcomer runs it: the commands are taken from the
//! block literally, so the README cannot drift from what works again (its first command
//! once failed for weeks, after a second binary made `cargo run` ambiguous, while every
//! test passed).
//!
//! The main job runs with the shortest options it has (appended to the README's line);
//! the test command cannot run itself, so the test checks that CI runs exactly it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The commands of the README's first `sh` block: lines that are neither blank nor
/// comments.
fn setup_commands(readme: &str) -> Vec<String> {
    let start = readme
        .find("```sh\n")
        .expect("the README has a ```sh set-up block")
        + "```sh\n".len();
    let len = readme[start..]
        .find("```")
        .expect("the set-up block is closed");
    readme[start..start + len]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn setup_block_has_the_main_job_then_the_test_command() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    // The set-up block opens the README: it is in the first section, before any other.
    let block = readme.find("```sh\n").unwrap();
    let second_section = readme
        .match_indices("\n## ")
        .nth(1)
        .map_or(readme.len(), |(i, _)| i);
    assert!(
        block < second_section,
        "the set-up block must open the README"
    );
    let commands = setup_commands(&readme);
    assert_eq!(
        commands.len(),
        2,
        "one main job, one test command: {commands:?}"
    );
    assert!(commands[0].ends_with(" demo"), "{commands:?}");
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(
        ci.lines()
            .any(|l| l.trim() == format!("exec {}", commands[1])),
        ".ci/run must run exactly the README's test command {:?}:\n{ci}",
        commands[1]
    );
}

#[test]
fn readme_main_job_runs_literally() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let main_job = setup_commands(&readme)
        .into_iter()
        .next()
        .expect("a main job");
    // The README's line, then the demo's shortest options: a small data set and a short
    // benchmark; the default image is the one the demo creates itself.
    let line = format!("{main_job} --data 4M --bench-secs 0.2");
    let out = Command::new("sh")
        .arg("-c")
        .arg(&line)
        .current_dir(&root)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`{line}` failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for needle in ["verified 4 MiB", "byte for byte", "detached cleanly"] {
        assert!(stdout.contains(needle), "{needle:?} missing:\n{stdout}");
    }
}
