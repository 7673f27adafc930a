//! Builds the application from settings and a listener, and runs it until stopped.
//!
//! Shutdown order (SIGTERM, SIGINT, or [`Application::handle`]): the server stops
//! accepting connections, in-flight requests finish (up to `shutdown_timeout_secs`), the
//! dispatcher stops leasing and settles the calls it has in flight, the spool sampler
//! stops, then the spool writer drains its queue, checkpoints and closes. Nothing that was
//! answered 200 depends on those last steps: it was durable before the answer.
//!
//! One process per data directory: with the embedded spool, `build` takes the data
//! directory's lock ([`crate::datadir`]) before it opens anything in it, and the
//! application holds it until it is dropped (after `run_until_stopped` has closed the spool).
//!
//! Signals: SIGTERM and SIGINT (Ctrl-C) both stop gracefully, by the order above. The
//! server's own signal handling is off, since it treats SIGINT as a forced stop (in-flight
//! requests dropped) and says so in the log, which a terminal user pressing Ctrl-C should
//! not get. A second signal does not cut the drain short; `shutdown_timeout_secs` bounds it.
//!
//! Readiness: `/readyz` answers 503 until [`Application::run_until_stopped`] has started
//! delivery and the sampler (the spool's start-up recovery runs inside `build`, before), and
//! again from the moment the server has stopped.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{middleware, web, App, HttpServer};

use crate::activity::Activity;
use crate::api::{self, OpsState};
use crate::config::{Settings, SpoolBackend};
use crate::datadir::{DataDirError, DataDirLock};
use crate::dispatch::routing::{Routing, SharedRouting};
use crate::dispatch::{Dispatcher, Journal};
use crate::ingest::{self, IngestState};
use crate::refiner::client::{ClientOptions, RefinerClient};
use crate::reload::Reloader;
use crate::request_id::request_id;
use crate::spool::{Backend, NatsSpool, Spool, SpoolError, SqliteSpool, SqliteSpoolOptions};
use crate::telemetry::Metrics;

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    DataDir(#[from] DataDirError),
    #[error("cannot open the spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("cannot set up delivery: {0}")]
    Delivery(String),
}

/// Checks what `serve` needs from the machine before it opens anything, so that
/// `check-config` refuses what `serve` could not start: with the embedded spool, a data
/// directory that is a directory (or can be created) and is writable; with the JetStream
/// spool, a readable credentials file when one is named. Creates and changes nothing.
pub fn preflight(settings: &Settings) -> Result<(), String> {
    match settings.spool.backend {
        SpoolBackend::Sqlite => writable_dir(&settings.data_dir),
        SpoolBackend::Nats => {
            let creds = &settings.nats.credentials_file;
            if creds.is_empty() {
                return Ok(());
            }
            std::fs::File::open(creds).map(drop).map_err(|e| {
                format!("nats.credentials_file (GATEWAY_NATS_CREDS): cannot read {creds}: {e}")
            })
        }
    }
}

/// `dir` is a writable directory, or the nearest existing ancestor is one (so `serve` can
/// create it).
fn writable_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let problem = |what: String| format!("data_dir (GATEWAY_DATA_DIR): {what}");
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => existing = parent,
            _ => {
                existing = std::path::Path::new(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        return Err(problem(format!(
            "{} is not a directory",
            existing.display()
        )));
    }
    let path = std::ffi::CString::new(existing.as_os_str().as_bytes())
        .map_err(|_| problem(format!("{} is not a valid path", existing.display())))?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    #[allow(unsafe_code)]
    let allowed = unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) } == 0;
    if !allowed {
        let what = if existing == dir {
            format!("{} is not writable by this user", dir.display())
        } else {
            format!(
                "{} does not exist and {} is not writable by this user",
                dir.display(),
                existing.display()
            )
        };
        return Err(problem(what));
    }
    Ok(())
}

/// A built, not yet running gateway.
pub struct Application {
    port: u16,
    server: Server,
    spool: Arc<dyn Spool>,
    /// The same backend through all the traits it implements.
    backend: Backend,
    metrics: Metrics,
    dispatcher: Option<Arc<Dispatcher>>,
    shutdown_timeout: Duration,
    stats_interval: Duration,
    source_slugs: Vec<String>,
    started: Arc<AtomicBool>,
    /// Reloads the configuration (SIGHUP, `POST /api/reload`).
    reloader: Arc<Reloader>,
    /// The data directory's lock (embedded spool only); released when the application is
    /// dropped, after the spool has closed.
    _data_dir_lock: Option<DataDirLock>,
}

/// Every route the gateway serves (docs/openapi.yaml documents them all; the API tests
/// check that the two agree, so a route is registered here or in a `configure` it calls).
pub fn routes(cfg: &mut web::ServiceConfig) {
    ingest::configure(cfg);
    api::configure(cfg);
}

/// Opens the configured spool backend, its options built from the settings here.
async fn open_backend(settings: &Settings, metrics: &Metrics) -> Result<Backend, StartError> {
    Ok(match settings.spool.backend {
        SpoolBackend::Sqlite => {
            let mut options = SqliteSpoolOptions::new(&settings.data_dir);
            options.dedup_window = Duration::from_secs(settings.spool.dedup_window_secs);
            options.queue_capacity = settings.spool.queue_capacity;
            options.max_group = settings.spool.max_group;
            options.dedup_flush_ids = settings.spool.dedup_flush_ids;
            options.dead_letter_retention =
                Duration::from_secs(settings.dead_letters.retention_days * 24 * 3600);
            options.sources = settings.sources.iter().map(|s| s.slug.clone()).collect();
            options.delivery_log = settings.delivery_log.options();
            Backend::sqlite(SqliteSpool::open(options, metrics.clone())?)
        }
        SpoolBackend::Nats => {
            Backend::nats_with_log(
                NatsSpool::open(settings.nats_spool_options(), metrics.clone()).await?,
                &settings.delivery_log.options(),
            )
            .await?
        }
    })
}

impl Application {
    /// Binds `settings.listen` and builds the application.
    pub async fn build(settings: &Settings) -> Result<Application, StartError> {
        let listener =
            TcpListener::bind(&settings.listen).map_err(|source| StartError::Listen {
                address: settings.listen.clone(),
                source,
            })?;
        Application::build_with_listener(settings, listener).await
    }

    /// Builds the application on an already bound listener (port 0 in tests).
    pub async fn build_with_listener(
        settings: &Settings,
        listener: TcpListener,
    ) -> Result<Application, StartError> {
        let data_dir_lock = match settings.spool.backend {
            SpoolBackend::Sqlite => Some(DataDirLock::acquire(&settings.data_dir)?),
            SpoolBackend::Nats => None,
        };
        let metrics = Metrics::new();
        let backend = open_backend(settings, &metrics).await?;
        let spool = backend.queue.clone();
        let activity = Arc::new(Activity::new(
            backend.delivery_log.clone(),
            settings.delivery_log.live_options(),
        ));

        let routing =
            Routing::from_settings(settings).map_err(|e| StartError::Delivery(e.to_string()))?;
        let routing = Arc::new(SharedRouting::new(routing));
        let reloader = Arc::new(Reloader::new(None, settings.clone(), routing.clone()));
        let dispatcher = build_dispatcher(settings, &spool, &metrics, &routing, &activity)?;

        let port = listener
            .local_addr()
            .map_err(|source| StartError::Listen {
                address: settings.listen.clone(),
                source,
            })?
            .port();
        let ingest_state = web::Data::new(
            IngestState::new(settings, spool.clone(), metrics.clone())
                .with_activity(activity.clone()),
        );
        let activity_state = web::Data::new(api::management::activity::ActivityState::new(
            &backend,
            activity,
            dispatcher.clone(),
        ));
        let started = Arc::new(AtomicBool::new(false));
        let management_state =
            web::Data::new(api::management::ManagementState::new(settings, &backend));
        let ops_state = web::Data::new(OpsState {
            spool: spool.clone(),
            metrics: metrics.clone(),
            started: started.clone(),
            metrics_token: settings
                .metrics_token
                .as_ref()
                .map(|token| api::management::auth::digest(token.expose())),
        });
        let console_sessions = api::console::store(
            settings
                .admin_token
                .as_ref()
                .map(|token| api::management::auth::digest(token.expose())),
            // `Settings::validate` refuses a proxy that is not an address.
            settings.console.proxies().unwrap_or_default(),
        );
        let reload_state = web::Data::from(reloader.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(reload_state.clone())
                .wrap(middleware::from_fn(request_id))
                .app_data(ingest_state.clone())
                .app_data(ops_state.clone())
                .app_data(management_state.clone())
                .app_data(console_sessions.clone())
                .app_data(activity_state.clone())
                .configure(routes)
                .default_service(web::to(ingest::not_found))
        })
        .shutdown_timeout(settings.shutdown_timeout_secs)
        .disable_signals()
        .listen(listener)
        .map_err(|source| StartError::Listen {
            address: settings.listen.clone(),
            source,
        })?
        .run();
        Ok(Application {
            port,
            server,
            spool,
            backend,
            metrics,
            dispatcher,
            shutdown_timeout: Duration::from_secs(settings.shutdown_timeout_secs),
            stats_interval: Duration::from_millis(settings.spool.stats_interval_ms),
            source_slugs: settings.sources.iter().map(|s| s.slug.clone()).collect(),
            started,
            reloader,
            _data_dir_lock: data_dir_lock,
        })
    }

    /// Names the configuration file a reload reads again (`serve --config`); without one, a
    /// reload is refused (there is nothing to read again).
    pub fn with_config_file(self, file: Option<std::path::PathBuf>) -> Application {
        self.reloader.set_file(file);
        self
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle to stop the server gracefully.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// The spool, for tests and tools that inspect what was accepted.
    pub fn spool(&self) -> Arc<dyn Spool> {
        self.spool.clone()
    }

    /// The spool through every trait its backend implements (dead letters, usage).
    pub fn backend(&self) -> Backend {
        self.backend.clone()
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// Serves (and delivers) until stopped, then settles in-flight deliveries and closes
    /// the spool.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let (stop_delivery, stopped) = watch::channel(false);
        let sampler = crate::telemetry::sampler::spawn(
            self.backend.clone(),
            self.metrics.clone(),
            self.stats_interval,
            self.source_slugs.clone(),
            stopped.clone(),
        );
        let workers = match &self.dispatcher {
            Some(dispatcher) => dispatcher.clone().start(stopped),
            None => Vec::new(),
        };
        let signals = tokio::spawn(stop_on_signal(self.server.handle()));
        let reloads = tokio::spawn(reload_on_sighup(self.reloader.clone()));
        self.started.store(true, Ordering::Release);
        let result = self.server.await;
        signals.abort();
        reloads.abort();
        self.started.store(false, Ordering::Release);
        let _ = stop_delivery.send(true);
        let drain = futures_util::future::join_all(workers);
        if tokio::time::timeout(self.shutdown_timeout, drain)
            .await
            .is_err()
        {
            tracing::warn!("delivery did not finish in time; unsettled events will be redelivered");
        }
        // The sampler stops at its next await; a sample in flight is bounded by the writer.
        let _ = tokio::time::timeout(Duration::from_secs(5), sampler).await;
        self.spool.close().await;
        tracing::info!("gateway stopped");
        result
    }
}

/// Reloads the configuration on every SIGHUP (see [`crate::reload`]); a refused reload is
/// logged with its error and changes nothing.
async fn reload_on_sighup(reloader: Arc<Reloader>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /api/reload");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        let reloader = reloader.clone();
        match tokio::task::spawn_blocking(move || reloader.reload()).await {
            Ok(Ok(_)) => tracing::info!("SIGHUP: configuration reloaded"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "SIGHUP: reload refused; the running configuration stays")
            }
            Err(e) => tracing::error!(error = %e, "SIGHUP: reload failed"),
        }
    }
}

/// Waits for SIGTERM or SIGINT, then stops the server gracefully (see the module header).
async fn stop_on_signal(server: ServerHandle) {
    let name = wait_for_signal().await;
    tracing::info!(
        signal = name,
        "stopping: in-flight requests finish, delivery settles"
    );
    server.stop(true).await;
}

/// The name of the first of SIGTERM and SIGINT to arrive. Without a way to listen for
/// SIGTERM (never on Unix in practice) only Ctrl-C stops the server.
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = ctrl_c() => "SIGINT",
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the gateway");
            ctrl_c().await;
            "SIGINT"
        }
    }
}

/// Ctrl-C; never, when it cannot be listened for.
async fn ctrl_c() {
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::warn!(error = %e, "cannot listen for SIGINT");
        std::future::pending::<()>().await;
    }
}

/// The dispatcher delivery runs, when `delivery.enabled`.
fn build_dispatcher(
    settings: &Settings,
    spool: &Arc<dyn Spool>,
    metrics: &Metrics,
    routing: &Arc<SharedRouting>,
    activity: &Arc<Activity>,
) -> Result<Option<Arc<Dispatcher>>, StartError> {
    if !settings.delivery.enabled {
        return Ok(None);
    }
    let client = RefinerClient::new(&ClientOptions {
        base_url: settings.refiner.base_url.clone(),
        timeout: Duration::from_secs(settings.delivery.timeout_secs),
        max_idle_per_host: settings.delivery.max_concurrency,
    })
    .map_err(StartError::Delivery)?;
    let mut dispatcher = Dispatcher::new(
        spool.clone(),
        client,
        &settings.sources,
        settings.delivery.clone(),
        settings.mapping.clone(),
        metrics.clone(),
    )
    .with_engage(&settings.engage)
    .with_routing(routing.clone())
    .with_activity(activity.clone());
    // The delivered journal names events by the SQLite spool's `seq`, which is never
    // reused; without it, delivery is the same, with more duplicates after a crash.
    if settings.spool.backend == SpoolBackend::Sqlite {
        match Journal::open(&settings.data_dir.join("delivered")) {
            Ok(journal) => dispatcher = dispatcher.with_journal(journal),
            Err(e) => tracing::warn!(
                error = %e,
                "cannot open the delivered journal; delivering without it"
            ),
        }
    }
    Ok(Some(Arc::new(dispatcher)))
}
