//! `netswap`: a command-line client for netswap servers, like `redis-cli`.
//!
//! Exit codes: 0 success; 1 connection or I/O failure; 2 bad usage; 10 + the status
//! code for a refusal by the server (11 ACCESS_VIOLATION, 12 ADDRESS_FAULT,
//! 14 MALFORMED, 15 TOO_LARGE, 16 QUOTA_EXCEEDED, 17 CONFLICT, 19 PROTOCOL_ERROR,
//! 20 BUSY).

use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use netswap_client::{
    Access, Client, Error, Event, Identity, MirrorEvent, NewOwner, Options, Pointer,
};

mod top;

/// Command-line client for netswap servers: create, read, write, watch and manage
/// records by their network pointers; print a server's counters.
///
/// Exit codes: 0 success, 1 connection or I/O failure, 2 usage, 10 + the status code
/// for a refusal (11 ACCESS_VIOLATION, 12 ADDRESS_FAULT, 15 TOO_LARGE, 16
/// QUOTA_EXCEEDED, 17 CONFLICT, 20 BUSY).
#[derive(Parser, Debug)]
#[command(name = "netswap", version)]
struct Cli {
    /// Server address.
    #[arg(
        long,
        short = 's',
        env = "NETSWAP_SERVER",
        default_value = "127.0.0.1:7420",
        global = true
    )]
    server: String,
    /// Local address to connect from (another address is another identity).
    #[arg(long, env = "NETSWAP_BIND", global = true)]
    bind: Option<IpAddr>,
    /// Seconds to wait for the connection and for each reply.
    #[arg(long, default_value_t = 30, global = true)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

/// Where data comes from: --data, --data-file, or standard input.
#[derive(Args, Debug)]
struct DataSource {
    /// The data, as text (or hex with --hex-input).
    #[arg(long, short = 'd', conflicts_with = "data_file")]
    data: Option<String>,
    /// Read the data from this file ("-" for standard input).
    #[arg(long, short = 'f')]
    data_file: Option<PathBuf>,
    /// --data is hex.
    #[arg(long)]
    hex_input: bool,
}

impl DataSource {
    fn none() -> DataSource {
        DataSource {
            data: None,
            data_file: None,
            hex_input: false,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    /// The bytes as they are.
    Raw,
    /// Lowercase hex.
    Hex,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeltaOutput {
    /// As text (bytes that are not printable ASCII escaped).
    Text,
    /// Lowercase hex.
    Hex,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a record and print its pointer. Data from --data, --data-file or stdin.
    /// Other identities can do nothing with it unless --access says so.
    Create {
        /// What other identities may do: none (the default: only you can use it), or
        /// a comma list of read, write, takeover (or all).
        #[arg(long, short = 'a', default_value = "none")]
        access: String,
        #[command(flatten)]
        source: DataSource,
    },
    /// Print a record's data (or a range of it).
    Read {
        /// The record's pointer (hex).
        ptr: Pointer,
        /// Start of the range.
        #[arg(long)]
        offset: Option<u64>,
        /// Length of the range.
        #[arg(long, requires = "offset")]
        len: Option<u32>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "raw")]
        output: Output,
    },
    /// Write bytes at an offset (growing the record if needed); print the new version.
    Write {
        /// The record's pointer.
        ptr: Pointer,
        /// Where to write (at most the current size).
        #[arg(long, default_value_t = 0)]
        at: u64,
        #[command(flatten)]
        source: DataSource,
    },
    /// Replace a record's data; print the new version.
    Replace {
        /// The record's pointer.
        ptr: Pointer,
        /// Only if the record is at this version (compare-and-swap).
        #[arg(long)]
        if_version: Option<u64>,
        #[command(flatten)]
        source: DataSource,
    },
    /// Delete a record (owner only).
    Delete {
        /// The record's pointer.
        ptr: Pointer,
    },
    /// Set what other identities may do (owner only).
    SetAccess {
        /// The record's pointer.
        ptr: Pointer,
        /// none, or a comma list of read, write, takeover (or all), as for create.
        #[arg(long, short = 'a')]
        access: String,
    },
    /// Take over a record whose takeover bit is set.
    Takeover {
        /// The record's pointer.
        ptr: Pointer,
    },
    /// Hand a record to another identity (owner only).
    Transfer {
        /// The record's pointer.
        ptr: Pointer,
        /// The new owner: an IP address or a 64-hex-digit identity.
        to: String,
    },
    /// Print a record's size, version, access bits and whether you own it, one
    /// `name: value` line each.
    Info {
        /// The record's pointer.
        ptr: Pointer,
        /// One JSON object instead.
        #[arg(long)]
        json: bool,
    },
    /// Print the server's limits and your identity.
    Hello,
    /// Print the server's counters (STATS) as a table, or as JSON.
    Stats {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A live view of the server's counters and rates, refreshed every second; q or
    /// Ctrl-C to quit.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Print a line for every change to a record until it is deleted or Ctrl-C.
    Watch {
        /// The record's pointer.
        ptr: Pointer,
        /// Print the bytes each change wrote (a data watch): one line per changed
        /// range, with its offset and length.
        #[arg(long)]
        data: bool,
        /// At most one line (or merged delta) per this many milliseconds.
        #[arg(long, default_value_t = 0)]
        interval: u32,
        /// How --data prints bytes.
        #[arg(long, short = 'o', value_enum, default_value = "text")]
        output: DeltaOutput,
    },
}

fn parse_access(s: &str) -> Result<Access, String> {
    let mut a = Access::empty();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        a |= match part.to_ascii_lowercase().as_str() {
            "none" => Access::empty(),
            "read" | "r" => Access::READ,
            "write" | "w" => Access::WRITE,
            "takeover" | "t" => Access::TAKEOVER,
            "all" => Access::all(),
            other => {
                return Err(format!(
                    "unknown access {other:?} (use none, read, write, takeover, all)"
                ));
            }
        };
    }
    Ok(a)
}

fn access_text(a: Access) -> String {
    let names: Vec<&str> = [
        (Access::READ, "read"),
        (Access::WRITE, "write"),
        (Access::TAKEOVER, "takeover"),
    ]
    .iter()
    .filter(|(bit, _)| a.contains(*bit))
    .map(|(_, n)| *n)
    .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(",")
    }
}

fn load(source: DataSource) -> Result<Bytes, String> {
    match (source.data, source.data_file) {
        (Some(d), _) if source.hex_input => {
            let d = d.trim();
            if d.len() % 2 != 0 {
                return Err("--data with --hex-input needs an even number of hex digits".into());
            }
            (0..d.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&d[i..i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map(Bytes::from)
                .map_err(|_| "--data is not valid hex".into())
        }
        (Some(d), _) => Ok(Bytes::from(d)),
        (None, Some(path)) if path.as_os_str() != "-" => std::fs::read(&path)
            .map(Bytes::from)
            .map_err(|e| format!("cannot read {}: {e}", path.display())),
        (None, _) => {
            let mut v = Vec::new();
            std::io::stdin()
                .read_to_end(&mut v)
                .map_err(|e| format!("cannot read standard input: {e}"))?;
            Ok(Bytes::from(v))
        }
    }
}

enum Failure {
    Usage(String),
    Client(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Client(e)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let options = Options {
        local_addr: cli.bind,
        connect_timeout: Duration::from_secs(cli.timeout),
        request_timeout: Some(Duration::from_secs(cli.timeout)),
        ..Options::default()
    };
    // Everything that can be wrong with the command line is found before connecting.
    let command = cli.command;
    let mut data = None;
    let mut access = Access::empty();
    let mut owner = None;
    match &command {
        Command::Create { access: a, .. } | Command::SetAccess { access: a, .. } => {
            access = parse_access(a).map_err(Failure::Usage)?;
        }
        Command::Transfer { to, .. } => {
            owner = Some(if let Ok(ip) = to.parse::<IpAddr>() {
                NewOwner::from(ip)
            } else if let Ok(id) = to.parse::<Identity>() {
                NewOwner::from(id)
            } else {
                return Err(Failure::Usage(format!(
                    "{to:?} is neither an IP address nor a 64-hex-digit identity"
                )));
            });
        }
        _ => {}
    }
    let command = match command {
        Command::Create { access, source } => {
            data = Some(load(source).map_err(Failure::Usage)?);
            Command::Create {
                access,
                source: DataSource::none(),
            }
        }
        Command::Write { ptr, at, source } => {
            data = Some(load(source).map_err(Failure::Usage)?);
            Command::Write {
                ptr,
                at,
                source: DataSource::none(),
            }
        }
        Command::Replace {
            ptr,
            if_version,
            source,
        } => {
            data = Some(load(source).map_err(Failure::Usage)?);
            Command::Replace {
                ptr,
                if_version,
                source: DataSource::none(),
            }
        }
        other => other,
    };
    let mut data = || data.take().unwrap_or_default();
    let client = Client::connect_with(cli.server.as_str(), options).await?;
    let mut out = std::io::stdout().lock();
    let w = |out: &mut std::io::StdoutLock, s: String| {
        let _ = writeln!(out, "{s}");
    };
    match command {
        Command::Create { .. } => {
            let ptr = client.create(access, data()).await?;
            w(&mut out, ptr.to_string());
        }
        Command::Read {
            ptr,
            offset,
            len,
            output,
        } => {
            let data = match offset {
                Some(off) => client.read_range(ptr, off, len.unwrap_or(u32::MAX)).await?,
                None => client.read(ptr).await?,
            };
            match output {
                Output::Raw => {
                    let _ = out.write_all(&data);
                }
                Output::Hex => w(&mut out, hex(&data)),
            }
        }
        Command::Write { ptr, at, .. } => {
            w(
                &mut out,
                client.write_at(ptr, at, data()).await?.to_string(),
            );
        }
        Command::Replace {
            ptr, if_version, ..
        } => {
            let v = match if_version {
                Some(v) => client.replace_if(ptr, v, data()).await?,
                None => client.replace(ptr, data()).await?,
            };
            w(&mut out, v.to_string());
        }
        Command::Delete { ptr } => client.delete(ptr).await?,
        Command::SetAccess { ptr, .. } => client.set_access(ptr, access).await?,
        Command::Takeover { ptr } => client.takeover(ptr).await?,
        Command::Transfer { ptr, .. } => {
            client.transfer(ptr, owner.expect("resolved above")).await?
        }
        Command::Info { ptr, json: true } => {
            let i = client.info(ptr).await?;
            let v = serde_json::json!({
                "size": i.size,
                "version": i.version,
                "access": access_text(i.access),
                "owned": i.owned,
            });
            w(&mut out, v.to_string());
        }
        Command::Info { ptr, .. } => {
            let i = client.info(ptr).await?;
            w(&mut out, format!("size: {}", i.size));
            w(&mut out, format!("version: {}", i.version));
            w(&mut out, format!("access: {}", access_text(i.access)));
            w(
                &mut out,
                format!("owned: {}", if i.owned { "yes" } else { "no" }),
            );
        }
        Command::Hello => {
            let h = client.hello().await?;
            w(&mut out, format!("server: {}", client.peer_addr()));
            w(&mut out, format!("protocol: {}", h.protocol));
            w(
                &mut out,
                format!("max-record-bytes: {}", h.max_record_bytes),
            );
            w(
                &mut out,
                format!("max-message-bytes: {}", h.max_message_bytes),
            );
            w(
                &mut out,
                format!("orphan-grace-seconds: {}", h.orphan_grace_secs),
            );
            w(&mut out, format!("identity: {}", h.identity));
        }
        Command::Stats { json } => {
            let stats = client.stats().await?;
            if json {
                let map: serde_json::Map<String, serde_json::Value> = stats
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::from(v)))
                    .collect();
                w(&mut out, serde_json::Value::Object(map).to_string());
            } else {
                let width = stats.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
                for (k, v) in stats {
                    w(&mut out, format!("{k:<width$}  {v}"));
                }
            }
        }
        Command::Top { interval } => {
            drop(out);
            return top::run(client, Duration::from_secs_f64(interval.max(0.1)))
                .await
                .map_err(Failure::Client);
        }
        Command::Watch {
            ptr,
            data: true,
            interval,
            output,
        } => {
            let mut mirror = client.mirror_with(ptr, interval).await?;
            let (version, size) = mirror.with_data(|d, v| (v, d.len()));
            w(
                &mut out,
                format!("watching {ptr} version {version} size {size}"),
            );
            let _ = out.flush();
            let show = |b: &[u8]| match output {
                DeltaOutput::Hex => hex(b),
                DeltaOutput::Text => b.escape_ascii().to_string(),
            };
            loop {
                let e = tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    e = mirror.next() => e,
                };
                let lines: Vec<String> = match e {
                    None => break,
                    Some(MirrorEvent::Updated {
                        version,
                        changed,
                        size,
                    }) => {
                        if changed.is_empty() {
                            vec![format!("delta {ptr} version {version} size {size}")]
                        } else {
                            changed
                                .iter()
                                .map(|(off, b)| {
                                    format!(
                                        "delta {ptr} version {version} size {size} at {off} len {}: {}",
                                        b.len(),
                                        show(b)
                                    )
                                })
                                .collect()
                        }
                    }
                    Some(MirrorEvent::Reloaded { version, size }) => {
                        vec![format!("reloaded {ptr} version {version} size {size}")]
                    }
                    Some(MirrorEvent::OwnerChanged) => vec![format!("owner-changed {ptr}")],
                    Some(MirrorEvent::AccessChanged) => vec![format!("access-changed {ptr}")],
                    Some(MirrorEvent::Deleted) => vec![format!("deleted {ptr}")],
                };
                for line in lines {
                    w(&mut out, line);
                }
                let _ = out.flush();
            }
        }
        Command::Watch { ptr, interval, .. } => {
            let mut watch = client.watch_with(ptr, interval).await?;
            w(&mut out, format!("watching {ptr}"));
            let _ = out.flush();
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    e = watch.next() => match e {
                        Some(e) => {
                            let what = match e.event {
                                Event::Changed => "changed",
                                Event::Deleted => "deleted",
                                Event::OwnerChanged => "owner-changed",
                                Event::AccessChanged => "access-changed",
                            };
                            w(&mut out, format!("{what} {} version {}", e.ptr, e.version));
                            let _ = out.flush();
                        }
                        None => break,
                    }
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("netswap: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("netswap: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Client(e)) => {
            eprintln!("netswap: {e}");
            match e.status() {
                Some(s) => ExitCode::from(10 + s as u8),
                None => ExitCode::FAILURE,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lists() {
        assert_eq!(parse_access("none"), Ok(Access::empty()));
        assert_eq!(parse_access("read,write"), Ok(Access::READ | Access::WRITE));
        assert_eq!(parse_access("all"), Ok(Access::all()));
        assert!(parse_access("reed").is_err());
        assert_eq!(
            access_text(Access::READ | Access::TAKEOVER),
            "read,takeover"
        );
    }
}
