//! The `mirror-mirror` binary: parse the command line, set up logging, run the subcommand.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;
use mirror_mirror::config::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Worker threads get a main thread's 8 MiB of stack rather than tokio's 2 MiB: a job's copy,
    // with the referrer copies nested in it, is a deep chain of futures, and a debug build's poll
    // frames are large (the tests' copies with signatures overflowed 2 MiB by a little). Untouched
    // stack costs no memory.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(8 * 1024 * 1024)
        .build();
    match runtime {
        Ok(rt) => rt.block_on(run()),
        Err(e) => {
            eprintln!("error: starting the async runtime failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    // PostgreSQL's notices ("relation … already exists, skipping" at every start) are not news.
    let quiet = "sqlx::postgres::notice=warn";
    let filter = EnvFilter::try_new(format!("{},{quiet}", cli.log))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{quiet}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if cli.log_format == "json" {
        builder.json().with_current_span(true).init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
    let result = match cli.command {
        Command::Copy(args) => mirror_mirror::cmd::copy(args)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Serve(args) => mirror_mirror::serve::run(*args)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Verify(args) => mirror_mirror::cmd::verify(*args).await.map(ExitCode::from),
        Command::Import(args) => mirror_mirror::cmd::import(args)
            .await
            .map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", mirror_mirror::cmd::error_line(&err));
            ExitCode::FAILURE
        }
    }
}
