//! Running an extension command the way Go flannel v0.28.2+ does: the text is split on
//! whitespace, then `$VAR` / `${VAR}` are expanded in each word (from flanneld's environment plus
//! the command's variables), and the words are executed directly — no shell, so a variable's
//! value is always one literal argument. stdin gets the given text and a newline.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

/// How much of a failing command's stderr goes into the error.
const STDERR_LIMIT: usize = 2048;

/// A command that could not run or did not succeed. Carries stderr but never stdout (stdout
/// may be BackendData or other secrets).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The command text has no words.
    #[error("{which} is empty")]
    Empty {
        /// Which of the four commands.
        which: &'static str,
    },
    /// The program could not be started.
    #[error("failed to run {which} {program:?}: {source}")]
    Spawn {
        /// Which of the four commands.
        which: &'static str,
        /// The program after expansion.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and failed.
    #[error("{which} {program:?} failed ({status}); stderr: {stderr:?}")]
    Failed {
        /// Which of the four commands.
        which: &'static str,
        /// The program after expansion.
        program: String,
        /// Exit status as text (`exit status 3`, `signal 9`).
        status: String,
        /// Its trimmed stderr (truncated).
        stderr: String,
    },
}

/// Expands `$VAR` and `${VAR}` like Go's `os.Expand` (unknown names become empty; a `$` not
/// followed by a name stays; `${}` and other bad syntax are dropped).
pub fn expand(word: &str, lookup: impl Fn(&str) -> String) -> String {
    let b = word.as_bytes();
    let mut out = String::with_capacity(word.len());
    let mut i = 0;
    let mut start = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            out.push_str(&word[start..i]);
            let (name, w) = shell_name(&word[i + 1..]);
            if name.is_empty() && w > 0 {
                // bad syntax: eat the characters
            } else if name.is_empty() {
                out.push('$');
            } else {
                out.push_str(&lookup(name));
            }
            i += 1 + w;
            start = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&word[start..]);
    out
}

/// Go's `getShellName`: the name after `$` and how many bytes it used.
fn shell_name(s: &str) -> (&str, usize) {
    let b = s.as_bytes();
    if b[0] == b'{' {
        if b.len() > 2 && is_special(b[1]) && b[2] == b'}' {
            return (&s[1..2], 3);
        }
        for i in 1..b.len() {
            if b[i] == b'}' {
                if i == 1 {
                    return ("", 2);
                }
                return (&s[1..i], i + 1);
            }
        }
        return ("", 1);
    }
    if is_special(b[0]) {
        return (&s[0..1], 1);
    }
    let n = b
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
        .count();
    (&s[..n], n)
}

fn is_special(c: u8) -> bool {
    matches!(c, b'*' | b'#' | b'$' | b'@' | b'!' | b'?' | b'-') || c.is_ascii_digit()
}

/// Splits on whitespace, then expands each word with flanneld's environment overlaid by `vars`.
pub fn argv(text: &str, vars: &[(&str, String)]) -> Vec<String> {
    let mut env: HashMap<String, String> = std::env::vars().collect();
    for (k, v) in vars {
        env.insert(k.to_string(), v.clone());
    }
    text.split_whitespace()
        .map(|w| expand(w, |name| env.get(name).cloned().unwrap_or_default()))
        .collect()
}

/// Runs one command to completion; returns its trimmed stdout.
pub fn run(
    which: &'static str,
    text: &str,
    vars: &[(&str, String)],
    stdin: &str,
) -> Result<String, CommandError> {
    let args = argv(text, vars);
    let Some((program, rest)) = args.split_first() else {
        return Err(CommandError::Empty { which });
    };
    let mut child = Command::new(program)
        .args(rest)
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CommandError::Spawn {
            which,
            program: program.clone(),
            source,
        })?;
    if let Some(mut input) = child.stdin.take() {
        let data = format!("{stdin}\n");
        // A command that does not read stdin closes it early: not an error.
        std::thread::spawn(move || {
            let _ = input.write_all(data.as_bytes());
        });
    }
    let out = child
        .wait_with_output()
        .map_err(|source| CommandError::Spawn {
            which,
            program: program.clone(),
            source,
        })?;
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if stderr.len() > STDERR_LIMIT {
            let mut cut = STDERR_LIMIT;
            while !stderr.is_char_boundary(cut) {
                cut -= 1;
            }
            stderr.truncate(cut);
            stderr.push_str("...");
        }
        let status = match (
            out.status.code(),
            std::os::unix::process::ExitStatusExt::signal(&out.status),
        ) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(s)) => format!("signal {s}"),
            _ => out.status.to_string(),
        };
        return Err(CommandError::Failed {
            which,
            program: program.clone(),
            status,
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> String {
        match name {
            "SUBNET" => "10.5.1.0/24".into(),
            "X" => "a b; rm -rf /".into(),
            "1" => "one".into(),
            _ => String::new(),
        }
    }

    #[test]
    fn expands_like_go_os_expand() {
        assert_eq!(expand("$SUBNET", env), "10.5.1.0/24");
        assert_eq!(expand("pre${SUBNET}post", env), "pre10.5.1.0/24post");
        assert_eq!(expand("$UNSET-x", env), "-x");
        assert_eq!(expand("cost$", env), "cost$");
        assert_eq!(expand("a${}b", env), "ab");
        assert_eq!(expand("$1x", env), "onex");
        assert_eq!(expand("${SUBNET", env), "SUBNET");
    }

    #[test]
    fn a_variable_value_is_one_argument_never_shell() {
        let v = argv(
            "echo $X ${SUBNET}",
            &[("X", "a b; rm -rf /".into()), ("SUBNET", "s".into())],
        );
        assert_eq!(v, vec!["echo", "a b; rm -rf /", "s"]);
    }

    #[test]
    fn failing_command_names_itself_its_status_and_stderr() {
        let e = run(
            "SubnetAddCommand",
            "sh -c $SCRIPT",
            &[("SCRIPT", "echo secret-out; echo boom >&2; exit 3".into())],
            "",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            r#"SubnetAddCommand "sh" failed (exit status 3); stderr: "boom""#
        );
        assert!(!e.contains("secret-out"));
    }

    #[test]
    fn stdin_is_the_data_and_a_newline() {
        let out = run("SubnetAddCommand", "od -c", &[], "ab").unwrap();
        assert!(out.contains("a   b  \\n"), "{out}");
    }
}
