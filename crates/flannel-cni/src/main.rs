//! `flannel` CNI plugin binary: environment + stdin in, result or error JSON out.

use std::io::{Read, Write};
use std::process::ExitCode;

use flannel_cni::result::SUPPORTED;
use flannel_cni::{handle, CniEnv};

fn main() -> ExitCode {
    let env = CniEnv::from_process();
    if env.command.is_empty() {
        eprintln!(
            "CNI Plugin flannel version {} (linux/amd64) commit flannel-rs",
            env!("CARGO_PKG_VERSION")
        );
        eprintln!("CNI protocol versions supported: {}", SUPPORTED.join(", "));
        return ExitCode::SUCCESS;
    }
    let mut stdin = Vec::new();
    if env.command != "VERSION" {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            let err = flannel_cni::error::CniError::new(
                flannel_cni::error::code::IO,
                format!("error reading from stdin: {e}"),
            );
            print!("{}", err.to_json());
            return ExitCode::FAILURE;
        }
    }
    let mut out = std::io::stdout();
    match handle(&env, &stdin) {
        Ok(Some(text)) => {
            let _ = out.write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = out.write_all(e.to_json().as_bytes());
            ExitCode::FAILURE
        }
    }
}
