//! `sandbox-holder`: the process that holds one sandbox started by
//! `SandboxBuilder::spawn` (see `sandbox::holder`). It reads its spec on
//! standard input and logs to standard error, the sandbox's `sandbox.log`.

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    sandbox::holder::main()
}
