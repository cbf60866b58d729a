//! `flannel` CNI plugin (placeholder until its own issue lands): answers VERSION and reports a
//! clear CNI error for everything else instead of failing obscurely.

use std::io::Write;
use std::process::ExitCode;

const SUPPORTED: &str = r#"["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]"#;

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut out = std::io::stdout();
    if command == "VERSION" {
        let _ = writeln!(
            out,
            r#"{{"cniVersion":"1.1.0","supportedVersions":{SUPPORTED}}}"#
        );
        return ExitCode::SUCCESS;
    }
    let _ = write!(
        out,
        r#"{{"code":999,"msg":"the flannel CNI plugin of flannel-rs is not implemented yet (CNI_COMMAND={})"}}"#,
        command.replace(['"', '\\'], "")
    );
    ExitCode::FAILURE
}
