//! Builds the application from settings and a listener, and runs it until stopped.
//!
//! Shutdown order (SIGTERM, SIGINT, or [`Application::handle`]): the server stops
//! accepting connections, in-flight requests finish (up to `shutdown_timeout_secs`), then
//! the spool writer drains its queue, checkpoints and closes. Nothing that was answered
//! 200 depends on that last step: it was durable before the answer.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{middleware, web, App, HttpServer};

use crate::api::{self, OpsState};
use crate::config::Settings;
use crate::ingest::{self, auth::Sources, IngestState};
use crate::request_id::request_id;
use crate::spool::{Spool, SpoolError, SqliteSpool, SqliteSpoolOptions};
use crate::telemetry::Metrics;

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("cannot open the spool: {0}")]
    Spool(#[from] SpoolError),
}

/// A built, not yet running gateway.
pub struct Application {
    port: u16,
    server: Server,
    spool: Arc<dyn Spool>,
    metrics: Metrics,
}

impl Application {
    /// Binds `settings.listen` and builds the application.
    pub fn build(settings: &Settings) -> Result<Application, StartError> {
        let listener =
            TcpListener::bind(&settings.listen).map_err(|source| StartError::Listen {
                address: settings.listen.clone(),
                source,
            })?;
        Application::build_with_listener(settings, listener)
    }

    /// Builds the application on an already bound listener (port 0 in tests).
    pub fn build_with_listener(
        settings: &Settings,
        listener: TcpListener,
    ) -> Result<Application, StartError> {
        let metrics = Metrics::new();
        let mut options = SqliteSpoolOptions::new(&settings.data_dir);
        options.dedup_window = std::time::Duration::from_secs(settings.spool.dedup_window_secs);
        options.queue_capacity = settings.spool.queue_capacity;
        options.max_group = settings.spool.max_group;
        let spool: Arc<dyn Spool> = Arc::new(SqliteSpool::open(options, metrics.clone())?);

        let port = listener
            .local_addr()
            .map_err(|source| StartError::Listen {
                address: settings.listen.clone(),
                source,
            })?
            .port();
        let ingest_state = web::Data::new(IngestState {
            spool: spool.clone(),
            sources: Sources::new(&settings.sources),
            limits: settings.limits.to_limits(),
            metrics: metrics.clone(),
        });
        let ops_state = web::Data::new(OpsState {
            spool: spool.clone(),
            metrics: metrics.clone(),
        });
        let server = HttpServer::new(move || {
            App::new()
                .wrap(middleware::from_fn(request_id))
                .app_data(ingest_state.clone())
                .app_data(ops_state.clone())
                .configure(ingest::configure)
                .configure(api::configure)
                .default_service(web::to(ingest::not_found))
        })
        .shutdown_timeout(settings.shutdown_timeout_secs)
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
            metrics,
        })
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

    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// Serves until stopped, then closes the spool.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        self.spool.close().await;
        tracing::info!("gateway stopped");
        result
    }
}
