//! `xenblkd generate-docs DIR` (hidden): the man pages and shell completions, generated
//! from the CLI definition itself so that they cannot go stale; the Debian package build
//! (`scripts/build-deb`) runs it and nothing generated is committed.
//!
//! Writes `DIR/man/xenblkd.1` and one `xenblkd-<subcommand>.1` per visible subcommand,
//! and `DIR/completions/{xenblkd.bash,_xenblkd,xenblkd.fish}`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

#[derive(Debug, clap::Args)]
pub struct GenerateDocsArgs {
    /// Directory to write `man/` and `completions/` into.
    #[arg(value_name = "DIR")]
    pub out_dir: PathBuf,
}

pub fn run(args: &GenerateDocsArgs) -> anyhow::Result<()> {
    let written = generate(&args.out_dir)?;
    for p in written {
        println!("{}", p.display());
    }
    Ok(())
}

/// Writes every page and completion script; returns the files written.
pub fn generate(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man_dir = out.join("man");
    let completion_dir = out.join("completions");
    for d in [&man_dir, &completion_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let cmd = crate::Cli::command();
    let mut pages = vec![("xenblkd".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("xenblkd-{}", sub.get_name());
        // The page's NAME and SYNOPSIS say `xenblkd-serve`, as git's and cargo's do.
        pages.push((
            name.clone(),
            sub.clone().display_name(name.clone()).bin_name(name),
        ));
    }
    for (name, page) in pages {
        let mut buf = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut buf)
            .with_context(|| format!("rendering {name}.1"))?;
        let path = man_dir.join(format!("{name}.1"));
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    for (shell, file) in [
        (Shell::Bash, "xenblkd.bash"),
        (Shell::Zsh, "_xenblkd"),
        (Shell::Fish, "xenblkd.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut crate::Cli::command(), "xenblkd", &mut buf);
        let path = completion_dir.join(file);
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_cover_the_cli() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        let main = std::fs::read_to_string(dir.path().join("man/xenblkd.1")).unwrap();
        assert!(
            main.starts_with(".ie") || main.contains(".TH xenblkd 1"),
            "{main}"
        );
        assert!(main.contains("serve"), "{main}");
        assert!(main.contains("log\\-level"), "{main}");
        // Hidden subcommands get no page.
        assert!(!dir.path().join("man/xenblkd-generate-docs.1").exists());
        let serve = std::fs::read_to_string(dir.path().join("man/xenblkd-serve.1")).unwrap();
        assert!(serve.contains("control\\-socket"), "{serve}");
        let bash = std::fs::read_to_string(dir.path().join("completions/xenblkd.bash")).unwrap();
        assert!(
            bash.contains("--control-socket") && bash.contains("status"),
            "{bash}"
        );
        for f in ["completions/_xenblkd", "completions/xenblkd.fish"] {
            let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(text.contains("handover"), "{f}: {text}");
        }
    }
}
