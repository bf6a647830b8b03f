//! `netswap-server`: see `--help`.

use std::process::ExitCode;

use clap::Parser;
use netswap_server::{Args, Server, ServerConfig, StartError, build_runtime};
use tracing_subscriber::EnvFilter;

/// With the `mimalloc` feature (the default): mimalloc instead of glibc's malloc, 7-20%
/// faster for a Redis Cluster gateway and as fast and as small for the embedded store
/// with transparent huge pages off (`--disable-thp`; docs/BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Before the first allocations that could land in huge pages (see `--disable-thp`);
    // put back as it was below when the flag says so.
    let thp_before = netswap_server::set_transparent_huge_pages_disabled(true);
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs redirected to a file stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match ServerConfig::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("netswap-server: {e}");
            return ExitCode::from(2);
        }
    };
    match thp_before {
        Ok(before) if !args.disable_thp => {
            if let Err(e) = netswap_server::set_transparent_huge_pages_disabled(before) {
                tracing::warn!(error = %e, "cannot leave transparent huge pages to the system");
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot turn transparent huge pages off for this process")
        }
    }
    let threads = args
        .threads
        // Measured on 2 vCPUs shared with clients (docs/BENCHMARKS.md): one worker
        // beat two at pipeline 1 and 16. Leave one CPU to the kernel's network work and
        // to co-located processes; use the rest.
        .unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
        });
    let runtime = match build_runtime(threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("netswap-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let server = match Server::bind(config.clone()).await {
            Ok(s) => s,
            Err(e @ StartError::Data(_)) => return Err((e.to_string(), ExitCode::from(3))),
            Err(e @ StartError::Store(_)) => return Err((e.to_string(), ExitCode::from(4))),
            Err(e) => return Err((e.to_string(), ExitCode::FAILURE)),
        };
        #[cfg(unix)]
        if server.data_dir().is_some() {
            // SIGUSR1: a snapshot now.
            let handle = server.snapshot_handle();
            let mut usr1 =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                    .expect("SIGUSR1 handler");
            tokio::spawn(async move {
                while usr1.recv().await.is_some() {
                    handle.request();
                }
            });
        }
        #[cfg(target_os = "linux")]
        if let Some(bytes) = config.receive_buffer
            && let Some(max) = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
            && bytes > max
        {
            tracing::warn!(
                receive_buffer = bytes,
                rmem_max = max,
                "--receive-buffer is over net.core.rmem_max: the kernel caps it there"
            );
        }
        let stop = shutdown_signal();
        println!("netswap-server listening on {}", server.local_addr());
        // Its own line, after the first: with port 0 the only way to learn the port.
        if let Some(metrics) = server.metrics_addr() {
            println!("netswap-server metrics on {metrics}");
        }
        tracing::info!(
            addr = %server.local_addr(),
            threads,
            orphan_grace_secs = config.store.orphan_grace.as_secs(),
            max_record_bytes = config.store.max_record_bytes,
            "listening"
        );
        server
            .run(stop)
            .await
            .map_err(|e| (e.to_string(), ExitCode::FAILURE))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((e, code)) => {
            eprintln!("netswap-server: {e}");
            code
        }
    }
}

/// Completes on SIGINT or SIGTERM. The handlers are installed here, when it is
/// called, not when the future is first polled: called before the server says it
/// listens, so that a signal sent right after that line stops it cleanly instead of
/// killing it (the default action of both signals).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
