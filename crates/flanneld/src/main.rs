//! `flanneld` binary: parses the Go-compatible command line and runs the daemon.

use std::collections::BTreeMap;
use std::process::ExitCode;

use flanneld::cli::{self, Command};
use flanneld::daemon::{self, Shutdown};

fn init_logging(verbosity: i64) {
    let level = match verbosity {
        i64::MIN..=-1 => "warn",
        0 => "info",
        1..=4 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// Keeps the resident size flat: large transient buffers (API list pages, netlink dumps) are
/// always mmapped and returned on free (glibc's dynamic threshold would otherwise move them into
/// the heap for good), and at most two malloc arenas exist.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// `flanneld doctor`: 0 = consistent, 1 = drift, 2 = could not look.
fn run_doctor(opts: &cli::Options, json: bool) -> ExitCode {
    // Only warnings and errors: the report itself goes to stdout.
    init_logging(-1_000);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("failed to start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(flanneld::doctor::run(opts, json)) {
        Ok(flanneld::doctor::Verdict::Consistent) => ExitCode::SUCCESS,
        Ok(flanneld::doctor::Verdict::Drift) => ExitCode::from(1),
        Err(e) => {
            eprintln!("flanneld doctor: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_else(|| "flanneld".into());
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("FLANNELD_"))
        .collect();
    let opts = match cli::parse(args, &env) {
        Ok(Command::Run(o)) => *o,
        Ok(Command::Doctor { opts, json }) => return run_doctor(&opts, json),
        Ok(Command::Help) => {
            eprint!("{}", cli::usage(&argv0));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{argv0}: {e}");
            eprintln!("Run '{argv0} --help' for the list of flags.");
            return ExitCode::from(2);
        }
    };
    if opts.version {
        eprintln!("{}", flanneld::VERSION);
        return ExitCode::SUCCESS;
    }
    init_logging(opts.v);
    // Before anything slow (config, lease): hold flannel's persistent TUN devices again, so
    // packets routed to them during start-up wait instead of being dropped.
    flanneld::backend::engine::preattach::grab_existing(&[
        flanneld::backend::udp::DEVICE,
        flanneld::backend::wireguard::DEVICE,
        flanneld::backend::wireguard::DEVICE_V6,
    ]);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(daemon::run(opts));
    runtime.shutdown_timeout(std::time::Duration::from_secs(3));
    match result {
        Ok(Shutdown::Signal) | Ok(Shutdown::LeaseRevoked) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
