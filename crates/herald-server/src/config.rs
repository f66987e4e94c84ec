//! Configuration: a TOML file, `HERALD_*` environment variables and command-line flags, merged in
//! that order (flags win) and validated into a [`Config`].
//!
//! Every key is described once in a schema ([`SCHEMA`] and [`CHANNEL_KEYS`]), which drives the
//! file check, the environment lookup (`HERALD_<KEY>`, `HERALD_<TABLE>__<KEY>`,
//! `HERALD_NAMESPACES__<NAME>__<KEY>`) and the `--set key=value` flag. An unknown key, a wrong
//! type or an impossible value is a [`ConfigError`] naming the key.
//!
//! ```
//! use herald_server::config::{Config, Sources};
//! let cfg = Config::load(&Sources {
//!     file: Some("[namespaces.market]\nhistory_size = 1000\nconflate = true".into()),
//!     ..Default::default()
//! })
//! .unwrap();
//! assert_eq!(cfg.namespaces["market"].history_size, 1000);
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use herald_core::node::Limits;
use herald_core::{ChannelOptions, Namespaces};
use toml::{Table, Value};

/// The type and admissible range of one key.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// A string.
    Str,
    /// A boolean.
    Bool,
    /// An array of strings (from the environment or a flag: comma-separated).
    StrList,
    /// An integer in `min..=max`.
    Int {
        /// Smallest admissible value.
        min: i64,
        /// Largest admissible value.
        max: i64,
    },
}

const fn int(min: i64, max: i64) -> Kind {
    Kind::Int { min, max }
}

const BYTES_MAX: i64 = 1 << 40;

/// Keys of a channel-options table (`[channel_defaults]` and each `[namespaces.NAME]`).
pub const CHANNEL_KEYS: &[(&str, Kind)] = &[
    ("history_size", int(0, 1_000_000)),
    ("history_ttl_secs", int(1, 365 * 86400)),
    ("conflate", Kind::Bool),
    ("client_publish", Kind::Bool),
    ("anonymous_subscribe", Kind::Bool),
];

/// Every key outside `[namespaces.*]`: `(table, key, kind)`, table `""` for top level.
pub const SCHEMA: &[(&str, &str, Kind)] = &[
    ("", "listen", Kind::Str),
    ("", "api_key", Kind::Str),
    ("", "previous_api_keys", Kind::StrList),
    ("", "broker", Kind::Str),
    ("", "ping_interval_secs", int(1, 3600)),
    ("", "log_level", Kind::Str),
    ("", "node_id", Kind::Str),
    ("", "shutdown_timeout_secs", int(0, 3600)),
    ("", "write_coalescing", Kind::Bool),
    ("", "api_threads", int(0, 64)),
    ("", "insecure", Kind::Bool),
    ("", "allowed_origins", Kind::StrList),
    ("limits", "max_message_bytes", int(16, BYTES_MAX)),
    ("limits", "max_body_bytes", int(64, BYTES_MAX)),
    ("limits", "max_publication_bytes", int(1, BYTES_MAX)),
    ("limits", "max_queue_bytes", int(1024, BYTES_MAX)),
    ("limits", "max_backlog_bytes", int(1 << 16, BYTES_MAX)),
    ("limits", "publish_timeout_ms", int(0, 600_000)),
    ("limits", "max_queue_messages", int(16, 1 << 30)),
    ("limits", "max_queue_burst_bytes", int(1024, BYTES_MAX)),
    ("limits", "slow_consumer_grace_ms", int(0, 3_600_000)),
    ("limits", "write_timeout_ms", int(100, 3_600_000)),
    ("limits", "max_subscriptions_per_connection", int(1, 1 << 20)),
    ("limits", "max_connections", int(1, 1 << 32)),
    ("limits", "max_connections_per_user", int(0, 1 << 32)),
    ("limits", "max_connections_per_ip", int(0, 1 << 32)),
    ("limits", "command_rate", int(1, 1 << 30)),
    ("limits", "command_burst", int(1, 1 << 30)),
    ("limits", "max_batch_publications", int(1, 1 << 24)),
    ("limits", "max_history_page", int(1, 1 << 20)),
    ("limits", "max_history_page_bytes", int(1024, BYTES_MAX)),
    ("limits", "socket_send_buffer_bytes", int(0, 1 << 30)),
    ("limits", "max_channels_per_stream", int(1, 4096)),
    ("limits", "socket_reserve", int(0, 1 << 20)),
    ("broker_tls", "ca_file", Kind::Str),
    ("broker_tls", "cert_file", Kind::Str),
    ("broker_tls", "key_file", Kind::Str),
    ("auth", "hmac_secret", Kind::Str),
    ("auth", "previous_hmac_secret", Kind::Str),
    ("auth", "allow_anonymous", Kind::Bool),
    ("auth", "leeway_secs", int(0, 3600)),
    ("auth", "audience", Kind::Str),
    ("auth", "issuer", Kind::Str),
];

/// Tables that hold channel options.
const CHANNEL_TABLE: &str = "channel_defaults";
const NAMESPACES: &str = "namespaces";

/// Why the configuration was refused; always names the key or the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not TOML.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A key is not known.
    #[error("unknown config key `{key}`")]
    UnknownKey {
        /// The key, dotted (`limits.max_foo`).
        key: String,
    },
    /// A key has the wrong type or an impossible value.
    #[error("config key `{key}`: {problem}")]
    Invalid {
        /// The key, dotted.
        key: String,
        /// What is wrong with its value.
        problem: String,
    },
    /// An environment variable Herald reads besides its keys (`RUST_LOG`) is unusable.
    #[error("environment variable `{name}`: {problem}")]
    Environment {
        /// The variable.
        name: String,
        /// What is wrong with its value.
        problem: String,
    },
}

/// Longest log filter accepted (`log_level`, `RUST_LOG`), in bytes.
pub const MAX_LOG_FILTER_BYTES: usize = 4096;

/// Builds the log filter `text` describes (tracing-subscriber's `EnvFilter` syntax:
/// `target[span{field=value}]=level`, comma-separated), or says why it is not one.
///
/// Safe on any input: the text must be ASCII and at most [`MAX_LOG_FILTER_BYTES`] long (the
/// filter parser panics on some non-ASCII input), whitespace around each directive is dropped,
/// field values are matched literally, never compiled as regular expressions (a field regex
/// could take tens of seconds and gigabytes to build), and of directives the parser holds for
/// the same one, only the last is given to it (see [`literal_value_key`]).
pub fn log_filter(text: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    if text.len() > MAX_LOG_FILTER_BYTES {
        return Err(format!("{} bytes; at most {MAX_LOG_FILTER_BYTES}", text.len()));
    }
    if let Some(c) = text.chars().find(|c| !c.is_ascii() || c.is_ascii_control()) {
        return Err(format!(
            "{text:?} is not a log filter: {c:?} is not a printable ASCII character"
        ));
    }
    // The parser splits on ',' too; trimming each directive here avoids its trim bug (it
    // indexes the untrimmed text with the trimmed text's positions).
    let mut directives: Vec<&str> =
        text.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    // redis-rs logs a warning per attempt while a Redis Cluster fails over (hundreds a
    // second); Herald says what matters itself. A filter that names `redis` wins.
    if !directives.iter().any(|d| d.starts_with("redis")) {
        directives.push("redis=error");
    }
    let parse = |directives: &str| {
        tracing_subscriber::EnvFilter::builder()
            .with_regex(false)
            .parse(directives)
            .map_err(|e| format!("{text:?} is not a log filter: {e}"))
    };
    // The parser keeps the last of directives it holds for the same one; it would panic on them
    // in a debug build, so the earlier ones are dropped here (each still checked on its own).
    let mut last = HashMap::new();
    for (i, d) in directives.iter().enumerate() {
        if let Some(key) = literal_value_key(d) {
            last.insert(key, i);
        }
    }
    let mut kept = Vec::with_capacity(directives.len());
    for (i, d) in directives.iter().enumerate() {
        match literal_value_key(d) {
            Some(key) if last[&key] != i => {
                parse(d)?;
            }
            _ => kept.push(*d),
        }
    }
    parse(&kept.join(","))
}

/// The parts by which tracing-subscriber (0.3.23) tells filter directives apart (target, span,
/// field name, value) when the directive matches a field value literally (its `Debug` form: a
/// value that is not a bool or a number); `None` for any other directive. The parser orders
/// directives by these parts and keeps the last of equal ones, but its equality of literal
/// values is broken (`ValueMatch`'s `PartialEq` has no arm for them: never equal), so in a build
/// with debug assertions two such directives, as in `[{user=alice}],[{user=alice}]=debug`,
/// panic ("invariant violated: Ordering::Equal must imply a.fields == b.fields"). Mirrors the
/// parser's `Directive::parse` on one trimmed directive without `,`.
fn literal_value_key(directive: &str) -> Option<(Option<&str>, Option<&str>, &str, &str)> {
    let (target, rest) = match directive.strip_prefix('[') {
        Some(rest) => (None, rest),
        None => {
            // `target=level` has no fields; `target[span{field=value}]=level` may.
            let i = directive.find(['=', '['])?;
            if directive.as_bytes()[i] == b'=' {
                return None;
            }
            (Some(&directive[..i]), &directive[i + 1..])
        }
    };
    let i = rest.find([']', '{'])?;
    if rest.as_bytes()[i] == b']' {
        return None;
    }
    let span = Some(&rest[..i]).filter(|s| !s.is_empty());
    let fields = &rest[i + 1..];
    let field = &fields[..fields.find('}')?];
    let mut parts = field.split('=');
    let name = parts.next()?;
    let value = parts.next()?;
    let number = value.parse::<bool>().is_ok()
        || value.parse::<u64>().is_ok()
        || value.parse::<i64>().is_ok()
        || value.parse::<f64>().is_ok();
    (!number).then_some((target, span, name, value))
}

/// Where configuration comes from, in increasing precedence.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The TOML text of `--config FILE`.
    pub file: Option<String>,
    /// The file's path, for messages.
    pub file_path: Option<String>,
    /// Environment variables (only `HERALD_*` ones are looked at).
    pub env: Vec<(String, String)>,
    /// `key=value` settings from flags, dotted keys.
    pub flags: Vec<(String, String)>,
}

/// Authentication settings (`[auth]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Secret of HS256 connection tokens.
    pub hmac_secret: Option<String>,
    /// A previous secret whose tokens are still accepted (rotation).
    pub previous_hmac_secret: Option<String>,
    /// `aud` of every token must name this, when set.
    pub audience: Option<String>,
    /// `iss` of every token must be this, when set.
    pub issuer: Option<String>,
    /// Connections without a token are allowed.
    pub allow_anonymous: bool,
    /// Clock skew allowed on the tokens' `exp`, `nbf` and `iat` (`leeway_secs`, default 5).
    pub leeway: Duration,
}

/// How the node reaches a TLS broker (`[broker_tls]`, for `rediss://`): PEM files read when
/// the node starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerTlsConfig {
    /// CAs to trust instead of the system's roots.
    pub ca_file: Option<String>,
    /// Client certificate chain, for a broker that authenticates clients by certificate.
    pub cert_file: Option<String>,
    /// The client certificate's private key.
    pub key_file: Option<String>,
}

/// The validated configuration of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Required as `Authorization: Bearer` on `/api/*` when set.
    pub api_key: Option<String>,
    /// Every key accepted on `/api/*`: `api_key`, then `previous_api_keys` (rotation); empty
    /// when no key is set.
    pub api_keys: Vec<String>,
    /// Listening beyond loopback without `api_key` and token auth is allowed (with a warning).
    pub insecure: bool,
    /// Browser origins allowed on `/ws` and `/sse` (normalized: lower case, no default port);
    /// empty: any.
    pub allowed_origins: Vec<String>,
    /// `memory`, or a `redis://`, `rediss://`, `redis-cluster://`, `rediss-cluster://` or
    /// `nats://` URL.
    pub broker: String,
    /// TLS files of a `rediss://` broker.
    pub broker_tls: BrokerTlsConfig,
    /// Interval of `ping` pushes.
    pub ping_interval: Duration,
    /// Log filter used when `RUST_LOG` is not set.
    pub log_level: String,
    /// The log filter in force: `RUST_LOG` when set and not empty, else `log_level`; checked
    /// with [`log_filter`], which builds it.
    pub log_filter: String,
    /// This node's id (random when not set).
    pub node_id: Option<String>,
    /// How long shutdown waits for clients to be told and flushed.
    pub shutdown_timeout: Duration,
    /// Write every frame queued for a connection in one vectored write (default); `false`
    /// writes one frame per system call, only to measure what coalescing gains.
    pub write_coalescing: bool,
    /// Threads of the runtime serving HTTP requests (publishers, the API), apart from the
    /// runtime that runs WebSocket and SSE connections; 0 serves everything on one runtime.
    pub api_threads: usize,
    /// Limits.
    pub limits: Limits,
    /// One HTTP request body; beyond: 413.
    pub max_body_bytes: usize,
    /// SO_SNDBUF of client sockets (the kernel doubles it); 0 leaves the kernel's autotuning.
    pub socket_send_buffer: usize,
    /// Channels one SSE stream may hold (bounds its `id:` line); beyond: 429.
    pub max_channels_per_stream: usize,
    /// Sockets accepted beyond `limits.max_connections` (HTTP API calls, health checks,
    /// handshakes in progress); a socket beyond both is answered 503 and closed at accept.
    pub socket_reserve: usize,
    /// Authentication.
    pub auth: AuthConfig,
    /// Options of channels in the default namespace and base of every namespace.
    pub channel_defaults: ChannelOptions,
    /// Named namespaces, fully resolved (defaults applied).
    pub namespaces: BTreeMap<String, ChannelOptions>,
}

impl Default for Config {
    fn default() -> Self {
        Config::load(&Sources::default()).expect("the defaults are valid")
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Str => "a string",
        Kind::Bool => "a boolean",
        Kind::StrList => "an array of strings",
        Kind::Int { .. } => "an integer",
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

fn check_value(key: &str, kind: Kind, v: &Value) -> Result<(), ConfigError> {
    let ok = match (kind, v) {
        (Kind::Str, Value::String(_)) | (Kind::Bool, Value::Boolean(_)) => true,
        (Kind::StrList, Value::Array(items)) => items.iter().all(Value::is_str),
        (Kind::Int { min, max }, Value::Integer(i)) => {
            if *i < min || *i > max {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    problem: format!("{i} is out of range {min}..={max}"),
                });
            }
            true
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key: key.into(),
            problem: format!("expected {}, found {}", kind_name(kind), type_name(v)),
        })
    }
}

/// Parses a string from the environment or a flag as a value of `kind`.
fn parse_text(key: &str, kind: Kind, text: &str) -> Result<Value, ConfigError> {
    let v = match kind {
        Kind::Str => Value::String(text.to_string()),
        Kind::StrList => Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        Kind::Bool => match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Value::Boolean(true),
            "false" | "0" | "no" | "off" => Value::Boolean(false),
            _ => {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    problem: format!("expected a boolean, found {text:?}"),
                })
            }
        },
        Kind::Int { .. } => match text.trim().replace('_', "").parse::<i64>() {
            Ok(i) => Value::Integer(i),
            Err(_) => {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    problem: format!("expected an integer, found {text:?}"),
                })
            }
        },
    };
    check_value(key, kind, &v)?;
    Ok(v)
}

/// The kind of a dotted key, if it exists: `listen`, `limits.max_queue_bytes`,
/// `channel_defaults.history_size`, `namespaces.NAME.conflate`.
fn kind_of(path: &[&str]) -> Option<Kind> {
    match path {
        [key] => SCHEMA.iter().find(|(t, k, _)| t.is_empty() && k == key).map(|e| e.2),
        [table, key] if *table == CHANNEL_TABLE => {
            CHANNEL_KEYS.iter().find(|(k, _)| k == key).map(|e| e.1)
        }
        [table, key] => SCHEMA.iter().find(|(t, k, _)| t == table && k == key).map(|e| e.2),
        [ns, _, key] if *ns == NAMESPACES => {
            CHANNEL_KEYS.iter().find(|(k, _)| k == key).map(|e| e.1)
        }
        _ => None,
    }
}

fn is_table_name(name: &str) -> bool {
    name == CHANNEL_TABLE || name == NAMESPACES || SCHEMA.iter().any(|(t, _, _)| *t == name)
}

/// Checks a parsed file against the schema.
fn check_file(table: &Table) -> Result<(), ConfigError> {
    for (key, value) in table {
        if is_table_name(key) {
            let Value::Table(inner) = value else {
                return Err(ConfigError::Invalid {
                    key: key.clone(),
                    problem: format!("expected a table, found {}", type_name(value)),
                });
            };
            for (k, v) in inner {
                if key == NAMESPACES {
                    let path = format!("{NAMESPACES}.{k}");
                    check_namespace_name(&path, k)?;
                    let Value::Table(ns) = v else {
                        return Err(ConfigError::Invalid {
                            key: path,
                            problem: format!("expected a table, found {}", type_name(v)),
                        });
                    };
                    for (nk, nv) in ns {
                        let full = format!("{path}.{nk}");
                        let kind = kind_of(&[NAMESPACES, k, nk])
                            .ok_or(ConfigError::UnknownKey { key: full.clone() })?;
                        check_value(&full, kind, nv)?;
                    }
                } else {
                    let full = format!("{key}.{k}");
                    let kind =
                        kind_of(&[key, k]).ok_or(ConfigError::UnknownKey { key: full.clone() })?;
                    check_value(&full, kind, v)?;
                }
            }
        } else {
            let kind = kind_of(&[key]).ok_or(ConfigError::UnknownKey { key: key.clone() })?;
            check_value(key, kind, value)?;
        }
    }
    Ok(())
}

fn check_namespace_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && name.len() < 255
        && name.bytes().all(|b| b != b':' && herald_protocol::channel::is_channel_byte(b));
    if valid {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key: key.into(),
            problem: format!("{name:?} is not a namespace name (channel characters, no ':')"),
        })
    }
}

/// Sets `path` in `table`, creating intermediate tables.
fn set_path(table: &mut Table, path: &[&str], value: Value) {
    let (last, parents) = path.split_last().expect("paths are never empty");
    let mut cur = table;
    for p in parents {
        let entry = cur.entry(p.to_string()).or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        cur = match entry {
            Value::Table(t) => t,
            _ => unreachable!("just made a table"),
        };
    }
    cur.insert(last.to_string(), value);
}

fn get<'a>(table: &'a Table, path: &[&str]) -> Option<&'a Value> {
    let (last, parents) = path.split_last()?;
    let mut cur = table;
    for p in parents {
        cur = cur.get(*p)?.as_table()?;
    }
    cur.get(*last)
}

fn get_str(t: &Table, path: &[&str]) -> Option<String> {
    get(t, path).and_then(Value::as_str).map(str::to_string)
}
fn get_bool(t: &Table, path: &[&str]) -> Option<bool> {
    get(t, path).and_then(Value::as_bool)
}
fn get_int(t: &Table, path: &[&str]) -> Option<i64> {
    get(t, path).and_then(Value::as_integer)
}

fn channel_options(t: &Table, prefix: &[&str], base: &ChannelOptions) -> ChannelOptions {
    let path = |k: &'static str| -> Vec<&str> {
        let mut p = prefix.to_vec();
        p.push(k);
        p
    };
    ChannelOptions {
        history_size: get_int(t, &path("history_size")).map_or(base.history_size, |v| v as usize),
        history_ttl: get_int(t, &path("history_ttl_secs"))
            .map_or(base.history_ttl, |v| Duration::from_secs(v as u64)),
        conflate: get_bool(t, &path("conflate")).unwrap_or(base.conflate),
        client_publish: get_bool(t, &path("client_publish")).unwrap_or(base.client_publish),
        anonymous_subscribe: get_bool(t, &path("anonymous_subscribe"))
            .unwrap_or(base.anonymous_subscribe),
    }
}

impl Config {
    /// Merges and validates `sources`.
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let mut table = match &sources.file {
            Some(text) => {
                let path = sources.file_path.clone().unwrap_or_else(|| "<config>".into());
                let table: Table = text.parse().map_err(|e: toml::de::Error| {
                    ConfigError::File { path, message: e.to_string() }
                })?;
                check_file(&table)?;
                table
            }
            None => Table::new(),
        };
        for (name, value) in &sources.env {
            let Some(rest) = name.strip_prefix("HERALD_") else { continue };
            let lower = rest.to_ascii_lowercase();
            let path: Vec<&str> = lower.split("__").collect();
            // Variables that name no key are ignored.
            let Some(kind) = kind_of(&path) else { continue };
            let key = path.join(".");
            if path.len() == 3 {
                check_namespace_name(&format!("{NAMESPACES}.{}", path[1]), path[1])?;
            }
            set_path(&mut table, &path, parse_text(&format!("{key} (from {name})"), kind, value)?);
        }
        for (key, value) in &sources.flags {
            let path: Vec<&str> = key.split('.').collect();
            let kind = kind_of(&path).ok_or(ConfigError::UnknownKey { key: key.clone() })?;
            if path.len() == 3 {
                check_namespace_name(&format!("{NAMESPACES}.{}", path[1]), path[1])?;
            }
            set_path(&mut table, &path, parse_text(key, kind, value)?);
        }
        let mut config = Config::from_table(&table)?;
        let rust_log = sources.env.iter().rev().find(|(k, _)| k == "RUST_LOG");
        if let Some((name, value)) = rust_log.filter(|(_, v)| !v.trim().is_empty()) {
            log_filter(value)
                .map_err(|problem| ConfigError::Environment { name: name.clone(), problem })?;
            config.log_filter = value.clone();
        }
        Ok(config)
    }

    fn from_table(t: &Table) -> Result<Config, ConfigError> {
        let invalid =
            |key: &str, problem: String| ConfigError::Invalid { key: key.into(), problem };
        let listen_text = get_str(t, &["listen"]).unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| invalid("listen", format!("{listen_text:?} is not an ADDR:PORT")))?;
        let api_key = get_str(t, &["api_key"]);
        if api_key.as_deref() == Some("") {
            return Err(invalid("api_key", "must not be empty (leave it out instead)".into()));
        }
        // Every key `/api/*` accepts: `api_key`, then the previous ones still honoured during a
        // rotation (which need an `api_key` beside them).
        let mut api_keys: Vec<String> = api_key.iter().cloned().collect();
        if let Some(Value::Array(items)) = get(t, &["previous_api_keys"]) {
            for key in items.iter().filter_map(Value::as_str) {
                if key.is_empty() {
                    return Err(invalid("previous_api_keys", "holds an empty key".into()));
                }
                if api_key.is_none() {
                    return Err(invalid(
                        "previous_api_keys",
                        "set api_key (the current key) beside the previous ones".into(),
                    ));
                }
                api_keys.push(key.to_string());
            }
        }
        let broker = get_str(t, &["broker"]).unwrap_or_else(|| "memory".into());
        let tls_broker = broker.starts_with("rediss://") || broker.starts_with("rediss-cluster://");
        if !(broker == "memory"
            || broker.starts_with("redis://")
            || broker.starts_with("redis-cluster://")
            || tls_broker
            || broker.starts_with("nats://"))
        {
            return Err(invalid(
                "broker",
                format!(
                    "{broker:?}: expected \"memory\", redis://HOST:PORT, rediss://HOST:PORT, \
                     redis-cluster://HOST:PORT,HOST:PORT,... (rediss-cluster:// for TLS) or \
                     nats://HOST:PORT"
                ),
            ));
        }
        let broker_tls = BrokerTlsConfig {
            ca_file: get_str(t, &["broker_tls", "ca_file"]),
            cert_file: get_str(t, &["broker_tls", "cert_file"]),
            key_file: get_str(t, &["broker_tls", "key_file"]),
        };
        if broker_tls.cert_file.is_some() != broker_tls.key_file.is_some() {
            return Err(invalid(
                "broker_tls.cert_file",
                "cert_file and key_file go together (both or neither)".into(),
            ));
        }
        if broker_tls != BrokerTlsConfig::default() && !tls_broker {
            return Err(invalid(
                "broker_tls",
                "TLS files are set but `broker` is not a rediss:// or rediss-cluster:// URL".into(),
            ));
        }
        let log_level = get_str(t, &["log_level"]).unwrap_or_else(|| "info".into());
        log_filter(&log_level).map_err(|problem| invalid("log_level", problem))?;
        let hmac_secret = get_str(t, &["auth", "hmac_secret"]);
        if hmac_secret.as_deref() == Some("") {
            return Err(invalid(
                "auth.hmac_secret",
                "must not be empty (leave it out instead)".into(),
            ));
        }
        let previous_hmac_secret = get_str(t, &["auth", "previous_hmac_secret"]);
        if previous_hmac_secret.is_some() && hmac_secret.is_none() {
            return Err(invalid(
                "auth.previous_hmac_secret",
                "set auth.hmac_secret (the current secret) beside the previous one".into(),
            ));
        }
        if previous_hmac_secret.as_deref() == Some("") {
            return Err(invalid(
                "auth.previous_hmac_secret",
                "must not be empty (leave it out instead)".into(),
            ));
        }
        let auth = AuthConfig {
            hmac_secret,
            previous_hmac_secret,
            audience: get_str(t, &["auth", "audience"]).filter(|a| !a.is_empty()),
            issuer: get_str(t, &["auth", "issuer"]).filter(|i| !i.is_empty()),
            allow_anonymous: get_bool(t, &["auth", "allow_anonymous"]).unwrap_or(true),
            leeway: Duration::from_secs(get_int(t, &["auth", "leeway_secs"]).unwrap_or(5) as u64),
        };
        let insecure = get_bool(t, &["insecure"]).unwrap_or(false);
        if !insecure
            && !listen.ip().is_loopback()
            && (api_key.is_none() || auth.hmac_secret.is_none())
        {
            return Err(invalid(
                "listen",
                format!(
                    "{listen} is reachable from outside loopback: set api_key and \
                     auth.hmac_secret first (or insecure = true to run without them)"
                ),
            ));
        }
        let allowed_origins = match get(t, &["allowed_origins"]) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(|o| {
                    crate::origin::normalize(o).ok_or_else(|| {
                        invalid(
                            "allowed_origins",
                            format!(
                                "{o:?} is not an origin (scheme://host[:port], no path, e.g. \
                                 \"https://app.example.com\")"
                            ),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => Vec::new(),
        };
        let defaults = Limits::default();
        let limit = |k: &str, d: usize| get_int(t, &["limits", k]).map_or(d, |v| v as usize);
        let limits = Limits {
            max_message_bytes: limit("max_message_bytes", defaults.max_message_bytes),
            max_publication_bytes: limit("max_publication_bytes", defaults.max_publication_bytes),
            max_queue_bytes: limit("max_queue_bytes", defaults.max_queue_bytes),
            max_backlog_bytes: limit("max_backlog_bytes", defaults.max_backlog_bytes),
            publish_timeout: get_int(t, &["limits", "publish_timeout_ms"])
                .map_or(defaults.publish_timeout, |v| Duration::from_millis(v as u64)),
            max_queue_messages: limit("max_queue_messages", defaults.max_queue_messages),
            max_queue_burst_bytes: limit("max_queue_burst_bytes", defaults.max_queue_burst_bytes),
            slow_consumer_grace: get_int(t, &["limits", "slow_consumer_grace_ms"])
                .map_or(defaults.slow_consumer_grace, |v| Duration::from_millis(v as u64)),
            write_timeout: get_int(t, &["limits", "write_timeout_ms"])
                .map_or(defaults.write_timeout, |v| Duration::from_millis(v as u64)),
            max_subscriptions_per_connection: limit(
                "max_subscriptions_per_connection",
                defaults.max_subscriptions_per_connection,
            ),
            max_connections: limit("max_connections", defaults.max_connections),
            max_connections_per_user: limit(
                "max_connections_per_user",
                defaults.max_connections_per_user,
            ),
            max_connections_per_ip: limit(
                "max_connections_per_ip",
                defaults.max_connections_per_ip,
            ),
            command_rate: limit("command_rate", defaults.command_rate as usize) as u32,
            command_burst: limit("command_burst", defaults.command_burst as usize) as u32,
            max_batch_publications: limit(
                "max_batch_publications",
                defaults.max_batch_publications,
            ),
            max_history_page: limit("max_history_page", defaults.max_history_page),
            max_history_page_bytes: limit(
                "max_history_page_bytes",
                defaults.max_history_page_bytes,
            ),
        };
        let max_body_bytes = limit("max_body_bytes", 8 << 20);
        let socket_send_buffer = limit("socket_send_buffer_bytes", 256 << 10);
        let max_channels_per_stream = limit("max_channels_per_stream", 64);
        let socket_reserve = limit("socket_reserve", 64);
        let channel_defaults = channel_options(t, &[CHANNEL_TABLE], &ChannelOptions::default());
        let mut namespaces = BTreeMap::new();
        if let Some(Value::Table(ns)) = get(t, &[NAMESPACES]) {
            for name in ns.keys() {
                namespaces.insert(
                    name.clone(),
                    channel_options(t, &[NAMESPACES, name], &channel_defaults),
                );
            }
        }
        Ok(Config {
            listen,
            api_key,
            api_keys,
            insecure,
            allowed_origins,
            broker,
            broker_tls,
            ping_interval: Duration::from_secs(
                get_int(t, &["ping_interval_secs"]).unwrap_or(25) as u64
            ),
            log_filter: log_level.clone(),
            log_level,
            node_id: get_str(t, &["node_id"]),
            shutdown_timeout: Duration::from_secs(
                get_int(t, &["shutdown_timeout_secs"]).unwrap_or(5) as u64,
            ),
            write_coalescing: get_bool(t, &["write_coalescing"]).unwrap_or(true),
            api_threads: get_int(t, &["api_threads"]).unwrap_or(1) as usize,
            limits,
            max_body_bytes,
            socket_send_buffer,
            max_channels_per_stream,
            socket_reserve,
            auth,
            channel_defaults,
            namespaces,
        })
    }

    /// The namespaces as the engine uses them.
    pub fn namespace_options(&self) -> Namespaces {
        let named: HashMap<String, ChannelOptions> =
            self.namespaces.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Namespaces::new(self.channel_defaults.clone(), named)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<Config, ConfigError> {
        Config::load(&Sources { file: Some(text.into()), ..Default::default() })
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.broker, "memory");
        assert_eq!(c.ping_interval, Duration::from_secs(25));
        assert_eq!(c.limits.max_message_bytes, 65536);
        assert_eq!(c.max_body_bytes, 8388608);
        assert_eq!(c.limits.max_queue_bytes, 1048576);
        assert_eq!((c.limits.max_history_page, c.limits.max_history_page_bytes), (1000, 524288));
        assert_eq!((c.max_channels_per_stream, c.socket_reserve), (64, 64));
        assert!(c.auth.allow_anonymous);
        assert_eq!(c.channel_defaults, ChannelOptions::default());
    }

    #[test]
    fn the_contract_example_is_accepted() {
        let c = file(
            r#"
listen = "127.0.0.1:9000"
api_key = "secret"
broker = "memory"
ping_interval_secs = 25
[limits]
max_message_bytes = 65536
max_body_bytes = 8388608
max_publication_bytes = 1048576
max_queue_bytes = 1048576
[auth]
hmac_secret = "0123456789abcdef0123"
allow_anonymous = true
[channel_defaults]
history_size = 0
history_ttl_secs = 300
conflate = false
client_publish = false
anonymous_subscribe = true
[namespaces.market]
history_size = 1000
conflate = true
"#,
        )
        .unwrap();
        let m = &c.namespaces["market"];
        assert_eq!((m.history_size, m.conflate, m.client_publish), (1000, true, false));
        assert_eq!(c.api_key.as_deref(), Some("secret"));
    }

    #[test]
    fn namespaces_inherit_channel_defaults() {
        let c = file("[channel_defaults]\nclient_publish = true\nhistory_size = 5\n[namespaces.a]\nhistory_size = 7").unwrap();
        assert_eq!(c.namespaces["a"].history_size, 7);
        assert!(c.namespaces["a"].client_publish);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("nope = 1", "`nope`"),
            ("[limits]\nmax_foo = 1", "`limits.max_foo`"),
            ("ping_interval_secs = \"x\"", "`ping_interval_secs`"),
            ("ping_interval_secs = 0", "`ping_interval_secs`"),
            ("[limits]\nmax_queue_bytes = -5", "`limits.max_queue_bytes`"),
            ("[limits]\nmax_history_page = 0", "`limits.max_history_page`"),
            ("[limits]\nmax_history_page_bytes = 10", "`limits.max_history_page_bytes`"),
            ("[limits]\nmax_channels_per_stream = 0", "`limits.max_channels_per_stream`"),
            ("[limits]\nsocket_reserve = -1", "`limits.socket_reserve`"),
            ("[namespaces.m]\nhistory_size = true", "`namespaces.m.history_size`"),
            ("[namespaces.m]\nbogus = 1", "`namespaces.m.bogus`"),
            ("[namespaces]\nm = 3", "`namespaces.m`"),
            ("limits = 3", "`limits`"),
            ("listen = \"nowhere\"", "`listen`"),
            ("broker = \"kafka://x\"", "`broker`"),
            (
                "broker = \"rediss://h:1\"\n[broker_tls]\ncert_file = \"c.pem\"",
                "`broker_tls.cert_file`",
            ),
            ("broker = \"redis://h:1\"\n[broker_tls]\nca_file = \"ca.pem\"", "`broker_tls`"),
            ("listen = \"0.0.0.0:8080\"", "`listen`"),
            ("[auth]\nhmac_secret = \"\"", "`auth.hmac_secret`"),
            ("[auth]\nleeway_secs = -1", "`auth.leeway_secs`"),
            ("[auth]\nleeway_secs = 3601", "`auth.leeway_secs`"),
            ("log_level = \" \u{e9}=info\"", "`log_level`"),
            ("log_level = \"a=nope\"", "`log_level`"),
            ("[\"namespaces\".\"a b\"]\nconflate = true", "`namespaces.a b`"),
        ];
        for (text, key) in cases {
            let err = file(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} gave {err:?}, expected it to name {key}");
        }
        assert!(matches!(file("listen = "), Err(ConfigError::File { .. })));
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let sources = Sources {
            file: Some("ping_interval_secs = 10\n[limits]\nmax_queue_bytes = 2048".into()),
            file_path: None,
            env: vec![
                ("HERALD_PING_INTERVAL_SECS".into(), "11".into()),
                ("HERALD_LIMITS__MAX_QUEUE_BYTES".into(), "4096".into()),
                ("HERALD_AUTH__HMAC_SECRET".into(), "0123456789abcdef".into()),
                ("HERALD_NAMESPACES__MARKET__CONFLATE".into(), "true".into()),
                ("HERALD_UNRELATED".into(), "whatever".into()),
                ("PATH".into(), "/bin".into()),
            ],
            flags: vec![("ping_interval_secs".into(), "12".into())],
        };
        let c = Config::load(&sources).unwrap();
        assert_eq!(c.ping_interval, Duration::from_secs(12));
        assert_eq!(c.limits.max_queue_bytes, 4096);
        assert_eq!(c.auth.hmac_secret.as_deref(), Some("0123456789abcdef"));
        assert!(c.namespaces["market"].conflate);
    }

    #[test]
    fn bad_env_value_names_key_and_variable() {
        let err = Config::load(&Sources {
            env: vec![("HERALD_LIMITS__MAX_BODY_BYTES".into(), "lots".into())],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("limits.max_body_bytes") && err.contains("HERALD_LIMITS__MAX_BODY_BYTES"),
            "{err}"
        );
    }

    #[test]
    fn unknown_flag_key_is_refused() {
        let err = Config::load(&Sources {
            flags: vec![("limits.nope".into(), "1".into())],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err, ConfigError::UnknownKey { key: "limits.nope".into() });
    }

    #[test]
    fn directives_the_parser_holds_for_the_same_keep_the_last() {
        // Found by the `config` fuzz target: tracing-subscriber panicked (debug builds) on two
        // directives matching the same literal field value; the crash input, reduced:
        let filter = |text: &str| log_filter(text).map(|f| f.to_string());
        assert_eq!(filter("[{.=}],[{.=}]").unwrap(), "redis=error,[{.=}]=trace");
        assert_eq!(filter("[{a=x}]=info,[{a=x}]=debug").unwrap(), "redis=error,[{a=x}]=debug");
        assert_eq!(filter("t[s{a=x=1}]=warn, t[s{a=x=2}]").unwrap(), "redis=error,t[s{a=x}]=trace");
        // Different directives all stay, as the parser alone keeps them; a dropped one must
        // still be a directive.
        let different = "[{a=x}],[{a=y}],[s{a=x}],t[{a=x}],[{b=x}],[{a}],redis=warn";
        let alone = tracing_subscriber::EnvFilter::builder().with_regex(false).parse(different);
        assert_eq!(filter(different).unwrap(), alone.unwrap().to_string());
        assert!(filter("[{a=x}]=loud,[{a=x}]").is_err());
        // Numbers and bools compare fine in the parser: left to it.
        assert_eq!(filter("[{a=1}]=info,[{a=1}]").unwrap(), "redis=error,[{a=1}]=trace");
        assert_eq!(
            filter("[{a=1}]=info,[{a=1.0}]=debug").unwrap(),
            "redis=error,[{a=1}]=info,[{a=1}]=debug"
        );
    }

    #[test]
    fn log_filters_are_checked_safely() {
        for good in ["info", " herald=debug , info ", "", "[span{a=x....................}]=debug"] {
            assert!(log_filter(good).is_ok(), "{good:?}");
        }
        for bad in [" \u{e9}=info", "\u{e9}", "a=\u{1F600}", "a\n=info", "a=nope", "[{}]"] {
            assert!(log_filter(bad).is_err(), "{bad:?}");
        }
        assert!(log_filter(&"a".repeat(MAX_LOG_FILTER_BYTES + 1)).is_err());
        let rust_log = |v: &str| {
            Config::load(&Sources {
                env: vec![("RUST_LOG".into(), v.into())],
                ..Default::default()
            })
        };
        let err = rust_log(" \u{e9}=info").unwrap_err().to_string();
        assert!(err.contains("RUST_LOG"), "{err}");
        assert_eq!(rust_log("debug").unwrap().log_filter, "debug");
        assert_eq!(rust_log("").unwrap().log_filter, "info", "an empty RUST_LOG is unset");
        assert_eq!(Config::default().auth.leeway, Duration::from_secs(5));
    }

    #[test]
    fn non_loopback_needs_key_and_secret() {
        let ok = file(
            "listen = \"0.0.0.0:1\"\napi_key = \"k\"\n[auth]\nhmac_secret = \"0123456789abcdef\"",
        );
        assert!(ok.is_ok());
    }
}
