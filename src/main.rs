//! Entry point: parses the command line and dispatches; no logic lives here.

use apim::cli::{self, Cli, Command};
use apim::config::Config;
use clap::Parser;
use std::process::ExitCode;

/// mimalloc rather than the C library's allocator: fewer lock round-trips under concurrent
/// requests (measured by `cargo bench --bench admin_writes`), and the same allocator on glibc
/// and musl builds.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    if let Command::Serve {
        config,
        issue_admin_token,
    } = &cli.command
    {
        let mut cfg = match config {
            Some(path) => match Config::load(path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            },
            None => Config::default(),
        };
        // --data-dir / APIM_DATA_DIR win over the file.
        if let Some(dir) = &cli.data_dir {
            cfg.data_dir = dir.clone();
        }
        return match runtime.block_on(apim::node::run(
            cfg,
            apim::node::RunOptions {
                issue_admin_token: *issue_admin_token,
            },
        )) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
