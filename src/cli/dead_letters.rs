//! `refiner-gateway dead-letters list|show|replay|purge`: a client of a running gateway's
//! management API (`docs/api.md`), for operators at a terminal.
//!
//! It only speaks HTTP to `--url` with the admin token (`--token`, or `GATEWAY_ADMIN_TOKEN`)
//! as a Bearer token; it never opens the spool itself, so it works the same against any
//! gateway it can reach. A long replay goes in chunks (`--chunk`, one request each) with a
//! progress bar on stderr (hidden when stderr is not a terminal), bounded to the dead
//! letters that existed when it started, so events that fail again meanwhile are not
//! replayed twice.
//!
//! Exit codes: 0 done, 1 the gateway refused or could not be reached, 2 a bad command line.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

/// The end of `dead-letters --help`.
pub const DEAD_LETTERS_EXAMPLES: &str = "Examples:
  export GATEWAY_ADMIN_TOKEN=change-me-admin-token
  refiner-gateway dead-letters list --source website
  refiner-gateway dead-letters list --all --query \"Order Completed\" --query-fields event
  refiner-gateway dead-letters show 17
  refiner-gateway dead-letters replay --start-at 2026-05-01
  refiner-gateway dead-letters purge --ends-at 2026-04-01 --yes";

/// `refiner-gateway dead-letters ...`
#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub action: Action,
}

/// Where the gateway is and how to authenticate.
#[derive(Debug, Args)]
pub struct Connection {
    /// Base URL of the running gateway.
    #[arg(
        long,
        global = true,
        env = "GATEWAY_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// Admin token of the management API.
    #[arg(
        long,
        global = true,
        env = "GATEWAY_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Slug of the source whose dead letters to act on.
    #[arg(long, global = true, default_value = "default")]
    pub source: String,
    /// Seconds to wait for each answer.
    #[arg(long, global = true, default_value_t = 60)]
    pub timeout_secs: u64,
}

/// Which dead letters (the list's filters).
#[derive(Debug, Args, Default)]
pub struct Filter {
    /// Dead-lettered at or after this time (ISO 8601, e.g. 2026-05-01 or 2026-05-01T10:00:00Z).
    #[arg(long)]
    pub start_at: Option<String>,
    /// Dead-lettered before this time (ISO 8601).
    #[arg(long)]
    pub ends_at: Option<String>,
    /// Case-insensitive text searched in the fields of --query-fields (the API's `q`).
    #[arg(long = "query", alias = "q", value_name = "TEXT")]
    pub q: Option<String>,
    /// Fields --query searches, comma-separated: messageId, user, event, type, last_error
    /// (default: all; the API's `q_f`).
    #[arg(
        long = "query-fields",
        aliases = ["q-f", "query-field"],
        value_name = "FIELDS"
    )]
    pub q_f: Option<String>,
    /// Only dead letters whose last answer from Refiner had this HTTP status, e.g. 401
    /// (the API's `status`).
    #[arg(long, value_name = "CODE")]
    pub status: Option<u16>,
}

impl Filter {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        for (name, value) in [
            ("start_at", &self.start_at),
            ("ends_at", &self.ends_at),
            ("q", &self.q),
            ("q_f", &self.q_f),
        ] {
            if let Some(value) = value {
                pairs.push((name, value.clone()));
            }
        }
        if let Some(status) = self.status {
            pairs.push(("status", status.to_string()));
        }
        pairs
    }

    fn is_empty(&self) -> bool {
        self.pairs().is_empty()
    }
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// List dead letters, newest first unless --sort says otherwise.
    ///
    /// The table's STATUS is Refiner's last answer (`-` for a timeout or a connection
    /// error) and ERROR its body or the error; --query searches that text, not the status.
    #[command(after_help = "Examples:
  refiner-gateway dead-letters list --source website
  refiner-gateway dead-letters list --all --query \"Order Completed\" --query-fields event
  refiner-gateway dead-letters list --json --sort -attempts --page-size 100")]
    List {
        #[command(flatten)]
        filter: Filter,
        /// Sort field, `-` first for descending: id, created_at, received_at, attempts,
        /// type, event, userId, messageId (the API's `o`).
        #[arg(
            long = "sort",
            alias = "o",
            allow_hyphen_values = true,
            value_name = "FIELD"
        )]
        o: Option<String>,
        /// Page to show (from 1).
        #[arg(long, default_value_t = 1)]
        page: u64,
        /// Rows per page (1-1000).
        #[arg(long, default_value_t = 25)]
        page_size: u64,
        /// Follow the pages to the end instead of showing one.
        #[arg(long)]
        all: bool,
        /// Print the API's JSON answers instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: the whole event and every delivery attempt (JSON).
    #[command(after_help = "Example:\n  refiner-gateway dead-letters show 17 --source website")]
    Show {
        /// The dead letter's id.
        id: i64,
    },
    /// Queue dead letters again, by id or by filter (all of the source's without either);
    /// they keep their order per user and are delivered by the gateway.
    #[command(after_help = "Examples:
  refiner-gateway dead-letters replay --id 17,18
  refiner-gateway dead-letters replay --start-at 2026-05-01 --chunk 1000")]
    Replay {
        /// Dead letters to replay (repeat or separate with commas).
        #[arg(long = "id", value_delimiter = ',')]
        ids: Vec<i64>,
        #[command(flatten)]
        filter: Filter,
        /// Dead letters replayed per request.
        #[arg(long, default_value_t = 1000)]
        chunk: u64,
    },
    /// Delete dead letters for good, by id or by filter.
    #[command(after_help = "Examples:
  refiner-gateway dead-letters purge --id 17
  refiner-gateway dead-letters purge --ends-at 2026-04-01 --yes")]
    Purge {
        /// Dead letters to delete (repeat or separate with commas).
        #[arg(long = "id", value_delimiter = ',')]
        ids: Vec<i64>,
        #[command(flatten)]
        filter: Filter,
        /// Confirm a purge by filter (or of everything, without one).
        #[arg(long)]
        yes: bool,
    },
}

/// Why a command failed: its message and exit code.
struct Failure(String, u8);

/// Runs the command; prints what it did, or one line on stderr.
pub fn run(args: DeadLettersArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("refiner-gateway: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(execute(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message, code)) => {
            eprintln!("refiner-gateway: {message}");
            ExitCode::from(code)
        }
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(connection: &Connection) -> Result<Client, Failure> {
        let token = connection
            .token
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Failure(
                    "no admin token: pass --token or set GATEWAY_ADMIN_TOKEN".into(),
                    2,
                )
            })?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(connection.timeout_secs.max(1)))
            .build()
            .map_err(|e| Failure(format!("cannot build the HTTP client: {e}"), 1))?;
        Ok(Client {
            http,
            base: format!(
                "{}/api/events/{}/dead-letters",
                connection.url.trim_end_matches('/'),
                connection.source
            ),
            token,
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, Failure> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| Failure(format!("cannot reach the gateway: {e}"), 1))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let message = body["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("the gateway answered {status}"));
        let reason = body["error"]["reason"].as_str().unwrap_or("");
        Err(Failure(format!("{message} ({status} {reason})"), 1))
    }

    async fn get(&self, url: &str, query: &[(&str, String)]) -> Result<Value, Failure> {
        self.send(self.http.get(url).query(query)).await
    }
}

async fn execute(args: DeadLettersArgs) -> Result<(), Failure> {
    let client = Client::new(&args.connection)?;
    match args.action {
        Action::List {
            filter,
            o,
            page,
            page_size,
            all,
            json,
        } => {
            let mut query = filter.pairs();
            if let Some(o) = o {
                query.push(("o", o));
            }
            query.push(("page", page.to_string()));
            query.push(("page_size", page_size.to_string()));
            let mut body = client.get(&client.base, &query).await?;
            let count = body["count"].as_u64().unwrap_or(0);
            if !json {
                print_header();
            }
            loop {
                if json {
                    println!("{body}");
                } else {
                    for row in body["results"].as_array().into_iter().flatten() {
                        print_row(row);
                    }
                }
                let next = body["next"].as_str().map(str::to_string);
                match next {
                    Some(next) if all => body = client.get(&next, &[]).await?,
                    _ => break,
                }
            }
            if !json {
                let pages = count.div_ceil(page_size.max(1)).max(1);
                if all {
                    println!("{count} dead letters");
                } else {
                    println!("page {page} of {pages} ({count} dead letters)");
                }
            }
            Ok(())
        }
        Action::Show { id } => {
            let body = client.get(&format!("{}/{id}", client.base), &[]).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&body).unwrap_or_else(|_| body.to_string())
            );
            Ok(())
        }
        Action::Replay { ids, filter, chunk } => replay(&client, ids, filter, chunk.max(1)).await,
        Action::Purge { ids, filter, yes } => {
            if ids.is_empty() && !yes {
                let what = if filter.is_empty() {
                    format!("every dead letter of source `{}`", args.connection.source)
                } else {
                    "every dead letter the filter selects".to_string()
                };
                return Err(Failure(
                    format!("purge deletes {what}; add --yes to confirm"),
                    2,
                ));
            }
            let mut deleted = 0;
            if ids.is_empty() {
                let body = client
                    .send(client.http.delete(&client.base).query(&filter.pairs()))
                    .await?;
                deleted += body["deleted"].as_u64().unwrap_or(0);
            } else {
                for part in ids.chunks(10_000) {
                    let body = client
                        .send(
                            client
                                .http
                                .delete(&client.base)
                                .query(&filter.pairs())
                                .json(&json!({ "ids": part })),
                        )
                        .await?;
                    deleted += body["deleted"].as_u64().unwrap_or(0);
                }
            }
            println!("deleted {deleted} dead letters");
            Ok(())
        }
    }
}

async fn replay(client: &Client, ids: Vec<i64>, filter: Filter, chunk: u64) -> Result<(), Failure> {
    let url = format!("{}/replay", client.base);
    let mut selection = serde_json::Map::new();
    for (name, value) in filter.pairs() {
        selection.insert(name.to_string(), json!(value));
    }
    // What exists now: how many to expect, and the highest id, which bounds the replay.
    let mut query = filter.pairs();
    query.push(("o", "-id".into()));
    query.push(("page_size", "1".into()));
    let head = client.get(&client.base, &query).await?;
    let Some(max_id) = head["results"][0]["id"].as_i64() else {
        println!("no dead letters to replay");
        return Ok(());
    };
    selection.insert("until_id".into(), json!(max_id));
    let total = if ids.is_empty() {
        head["count"].as_u64().unwrap_or(0)
    } else {
        ids.len() as u64
    };
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} replayed ({per_sec}, {eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut replayed = 0;
    let batches: Vec<Option<&[i64]>> = if ids.is_empty() {
        vec![None]
    } else {
        ids.chunks(chunk as usize).map(Some).collect()
    };
    for batch in batches {
        loop {
            let mut body = selection.clone();
            match batch {
                Some(part) => {
                    body.insert("ids".into(), json!(part));
                }
                None => {
                    body.insert("limit".into(), json!(chunk));
                }
            }
            let answer = client
                .send(client.http.post(&url).json(&Value::Object(body)))
                .await
                .inspect_err(|_| bar.abandon())?;
            let n = answer["replayed"].as_u64().unwrap_or(0);
            replayed += n;
            bar.inc(n);
            let remaining = answer["remaining"].as_u64().unwrap_or(0);
            if batch.is_some() || n == 0 || remaining == 0 {
                break;
            }
        }
    }
    bar.finish_and_clear();
    println!("replayed {replayed} dead letters");
    Ok(())
}

fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

fn print_header() {
    println!(
        "{:>8}  {:<24}  {:<8}  {:<20}  {:<20}  {:>8}  {:>6}  ERROR",
        "ID", "DEAD-LETTERED", "TYPE", "USER", "EVENT", "ATTEMPTS", "STATUS"
    );
}

fn print_row(row: &Value) {
    let text = |key: &str| row[key].as_str().unwrap_or("").to_string();
    let user = row["userId"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| {
            // Email-only and anonymous users have no userId; the printable name says who.
            text("printable_name")
                .rsplit_once(" of ")
                .map(|(_, who)| who.to_string())
                .unwrap_or_default()
        });
    let status = row["last_status"]
        .as_u64()
        .map_or("-".to_string(), |s| s.to_string());
    println!(
        "{:>8}  {:<24}  {:<8}  {:<20}  {:<20}  {:>8}  {:>6}  {}",
        row["id"].as_i64().unwrap_or(0),
        text("created_at"),
        cut(&text("type"), 8),
        cut(&user, 20),
        cut(&text("event"), 20),
        row["attempts"].as_u64().unwrap_or(0),
        status,
        cut(&text("last_error").replace('\n', " "), 60),
    );
}
