//! What both binaries do the same way as processes: the async runtime (and the allocator
//! settings it needs), logging set-up and waiting for a shutdown signal.

/// Builds the runtime a binary runs on, after [`tune_allocator`], with `workers` threads
/// (default: one per CPU, or `TOKIO_WORKER_THREADS`).
///
/// One worker means a single-threaded runtime: the future given to `block_on` and every
/// task it spawns share the calling thread, with no scheduler hand-overs between threads.
pub fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    tune_allocator();
    let mut builder = match workers {
        Some(n) if n <= 1 => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

/// glibc's allocator gives the top of its heap back to the kernel as soon as more than
/// 128 KiB there is free, and maps allocations over 128 KiB freshly each time. A tunnel frees
/// and reallocates 64 KiB buffers (splice buffers, multiplexer frames) thousands of times a
/// second, so with the defaults every one of those comes back as fresh pages: measured in
/// tether-bench's bulk case, about 750,000 page faults in the proxy and 430,000 in the agent
/// per 4 GB, and half the single-stream throughput (see benches/RESULTS.md). Trimming only
/// beyond 32 MiB free and mapping only allocations over 4 MiB ends that (under 10,000 faults).
/// Idle memory is unaffected: buffers are still freed while connections are idle, and the
/// freed memory is reused by the next connection. `GLIBC_TUNABLES` set by an operator wins.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("GLIBC_TUNABLES").is_some() {
            return;
        }
        // SAFETY: mallopt only sets allocator parameters; called before any other thread
        // exists (the runtime is built after it).
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        }
    }
}

/// Logs to stderr, filtered by `TETHER_LOG` (default `info`), as text (coloured on a
/// terminal) or as JSON lines.
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
