//! What the console's routes read besides the management state: the delivery log, the
//! live feed and per-minute counts, the dispatcher's breaker and limiter, the queue.
//! Handlers: [`super::events`] (lookup), [`super::live`] (server-sent events),
//! [`super::overview`].

use std::sync::Arc;

use crate::activity::Activity;
use crate::dispatch::Dispatcher;
use crate::spool::delivery_log::DeliveryLog;
use crate::spool::{Backend, Metering, Spool};

/// The console routes' shared state (in the app data beside `ManagementState`).
pub struct ActivityState {
    pub(super) log: Option<Arc<dyn DeliveryLog>>,
    pub(super) activity: Arc<Activity>,
    pub(super) dispatcher: Option<Arc<Dispatcher>>,
    pub(super) queue: Arc<dyn Spool>,
    pub(super) metering: Option<Arc<dyn Metering>>,
}

impl ActivityState {
    pub fn new(
        backend: &Backend,
        activity: Arc<Activity>,
        dispatcher: Option<Arc<Dispatcher>>,
    ) -> ActivityState {
        ActivityState {
            log: backend.delivery_log.clone(),
            activity,
            dispatcher,
            queue: backend.queue.clone(),
            metering: backend.metering.clone(),
        }
    }
}
