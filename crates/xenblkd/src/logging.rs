//! Where the log goes and at what level: owns the `tracing` subscriber of the process.
//!
//! Level, first that is given wins: `--log-level`, then `RUST_LOG`, then the configuration
//! file's `log_level` (`serve` only, applied once the file is read and again at each
//! reload), then the subcommand's default. The flag is what the operator typed for this
//! run; `RUST_LOG` is the environment (a unit's `Environment=` drop-in for a debugging
//! session) and so overrides the file, which is the host's standing setting.
//!
//! Target: `stderr` (formatted lines, timestamps included) or `journal` (systemd's native
//! protocol through `tracing-journald`: one datagram per event, the level as `PRIORITY`,
//! every field of the event as a journal field of its own name upper-cased, `DEVICE=`,
//! `DOMID=`..., no timestamp of ours since the journal stamps every entry). `auto` picks
//! the journal when systemd connected stderr to it (`JOURNAL_STREAM` names stderr's
//! device and inode, as sd_journal_stream_fd(3) documents) and the journal's socket
//! answers, else stderr.

use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

use anyhow::{bail, Context};
use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogTarget {
    /// The journal if systemd connected stderr to it, else stderr.
    Auto,
    /// Formatted lines on stderr.
    Stderr,
    /// The journal's native protocol (structured fields, priorities).
    Journal,
}

/// Where the level in force came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LevelSource {
    /// `--log-level`.
    Flag,
    /// `RUST_LOG`.
    Env,
    /// The subcommand's default.
    Default,
}

/// The installed subscriber's level, changeable while the process runs.
#[derive(Debug)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    source: LevelSource,
    default_level: &'static str,
    target: LogTarget,
}

static CONTROL: OnceLock<LogControl> = OnceLock::new();

/// The registry with its level filter: what the output layer is stacked on.
type Filtered = tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>;

/// The subscriber's control, once [`init`] ran.
pub fn control() -> Option<&'static LogControl> {
    CONTROL.get()
}

/// Checks a level or filter directive (`info`, `xenbus=debug,warn`) as `RUST_LOG` takes it.
/// A bare word is a level, never a target: EnvFilter would read `infoo` as "everything
/// from a module called infoo" and silently log nothing of ours.
pub fn parse_filter(spec: &str) -> anyhow::Result<EnvFilter> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains(['=', '[', ':'])
            && !LEVELS.contains(&directive.to_ascii_lowercase().as_str())
        {
            bail!("invalid log level {directive:?} in {spec:?} (expected one of {LEVELS:?}, or target=level)");
        }
    }
    EnvFilter::builder()
        .parse(spec)
        .with_context(|| format!("invalid log level {spec:?}"))
}

/// Whether systemd connected our stderr to the journal: `JOURNAL_STREAM` is
/// `<device>:<inode>` of the stream it gave us, and stderr is still that stream (a child
/// whose stderr was redirected inherits the variable but not the stream).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// The journal's levels: tracing-journald's default puts `info` at Notice (5); the
/// lifecycle lines are ordinary information (6), and debug is debug (7).
fn priorities() -> PriorityMappings {
    PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    }
}

/// Installs the process's subscriber.
pub fn init(
    flag: Option<&str>,
    target: LogTarget,
    default_level: &'static str,
) -> anyhow::Result<&'static LogControl> {
    let env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let (filter, source) = match (flag, env) {
        (Some(f), _) => (parse_filter(f)?, LevelSource::Flag),
        (None, Some(e)) => (parse_filter(&e)?, LevelSource::Env),
        (None, None) => (parse_filter(default_level)?, LevelSource::Default),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let journal = match target {
        LogTarget::Stderr => None,
        LogTarget::Journal => Some(
            tracing_journald::layer()
                .context("--log-target journal: the journal's socket does not answer")?,
        ),
        // systemd said stderr is the journal but its socket does not answer (a container
        // without journald's native socket): stderr then, which still reaches the journal.
        LogTarget::Auto if stderr_is_journal() => tracing_journald::layer().ok(),
        LogTarget::Auto => None,
    };
    let resolved = if journal.is_some() {
        LogTarget::Journal
    } else {
        LogTarget::Stderr
    };
    let output: Box<dyn Layer<Filtered> + Send + Sync> = match journal {
        Some(layer) => Box::new(
            layer
                // Fields keep their own names (`device` is DEVICE=), so `journalctl
                // DEVICE=vbd/5/51712` finds a device's lines; none of ours starts with
                // an underscore, which journald reserves for the fields it trusts.
                .with_field_prefix(None)
                .with_syslog_identifier("xenblkd".into())
                .with_priority_mappings(priorities()),
        ),
        None if stderr_is_journal() => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                // The journal stamps every line itself.
                .without_time(),
        ),
        None => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour codes only for a person at a terminal: logs usually go to files
                // (the lab's, libxl's qemu-dm-<guest>.log), where they break grep.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .context("installing the log subscriber")?;
    let control = LogControl {
        handle,
        source,
        default_level,
        target: resolved,
    };
    if CONTROL.set(control).is_err() {
        bail!("logging initialised twice");
    }
    Ok(CONTROL.get().expect("set above"))
}

impl LogControl {
    /// The target in use (`Journal` or `Stderr`, never `Auto`).
    pub fn target(&self) -> LogTarget {
        self.target
    }

    /// Applies the configuration file's `log_level` (none: the subcommand's default)
    /// unless the flag or `RUST_LOG` set the level. Returns what the level now is, or
    /// why the file's setting was not applied.
    pub fn apply_config(&self, level: Option<&str>) -> anyhow::Result<ConfigLevel> {
        match self.source {
            LevelSource::Flag => return Ok(ConfigLevel::Overridden("--log-level")),
            LevelSource::Env => return Ok(ConfigLevel::Overridden("RUST_LOG")),
            LevelSource::Default => {}
        }
        let spec = level.unwrap_or(self.default_level);
        let filter = parse_filter(spec)?;
        self.handle
            .reload(filter)
            .context("changing the log level")?;
        Ok(ConfigLevel::Applied(spec.to_string()))
    }
}

/// What became of the configuration's `log_level`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigLevel {
    /// In force now.
    Applied(String),
    /// Not applied: the flag or `RUST_LOG` (named) set the level.
    Overridden(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked() {
        parse_filter("info").unwrap();
        parse_filter("xenbus=debug,warn").unwrap();
        assert!(parse_filter("loud").is_err());
        assert!(parse_filter("xenbus=shouting").is_err());
    }

    #[test]
    fn journal_stream_must_be_stderr() {
        // Test binaries are not started by systemd; a JOURNAL_STREAM naming something else
        // than our stderr (inherited, then redirected) is not the journal.
        let meta = std::fs::metadata("/proc/self/fd/2").unwrap();
        std::env::set_var("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        assert!(stderr_is_journal());
        std::env::set_var(
            "JOURNAL_STREAM",
            format!("{}:{}", meta.dev(), meta.ino() + 1),
        );
        assert!(!stderr_is_journal());
        std::env::set_var("JOURNAL_STREAM", "garbage");
        assert!(!stderr_is_journal());
        std::env::remove_var("JOURNAL_STREAM");
        assert!(!stderr_is_journal());
    }
}
