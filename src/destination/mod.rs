//! Destinations: the narrow trait every backend implements, and the registry
//! that builds one instance per configured resource.
//!
//! Only this module tree depends on network client crates. Backends never
//! retry or schedule: they make one attempt and classify its failure into a
//! [`DeliveryError`]; the dispatcher owns the retry policy. Delivery is at
//! least once, so every backend must tolerate a duplicate carrying the same
//! record id (and pass that id on wherever the destination has a dedup key).

pub mod file;
pub mod webhook;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::{Config, ResourceConfig};
use crate::error::DeliveryError;
use crate::record::{DestKind, DestinationType};

/// One record on its way out: the journaled JSON plus what backends need to
/// address it.
#[derive(Debug, Clone)]
pub struct OutgoingRecord {
    /// Record id (ULID), the idempotency key at the destination.
    pub id: String,
    /// The platform's call id.
    pub fn_call_id: String,
    /// Function id (stream key, notification title).
    pub function_id: String,
    /// Success or failure destination.
    pub destination_type: DestinationType,
    /// Kind of the destination.
    pub kind: DestKind,
    /// Resource id (config table key).
    pub resource_id: String,
    /// Channel of a QUEUE destination.
    pub channel_id: Option<String>,
    /// The record JSON (SPEC section 3), exactly as journaled.
    pub body: Bytes,
    /// Attempt number of this send, starting at 1.
    pub attempt: u32,
}

/// A configured destination resource. Object-safe; held as `Arc<dyn Destination>`.
#[async_trait]
pub trait Destination: Send + Sync + 'static {
    /// Backend name (`file`, `webhook`, ...).
    fn backend(&self) -> &'static str;

    /// One attempt to deliver one record. `Ok` only once the destination has
    /// confirmed it (fsync, 2xx, broker ack).
    async fn send(&self, record: &OutgoingRecord) -> Result<(), DeliveryError>;

    /// Cheap check that the destination is usable (readiness, circuit probes).
    async fn health(&self) -> Result<(), DeliveryError> {
        Ok(())
    }
}

/// Identifies a resource: its kind and config key.
pub type ResourceKey = (DestKind, String);

/// All built destinations, by resource.
#[derive(Clone, Default)]
pub struct Registry {
    map: HashMap<ResourceKey, Arc<dyn Destination>>,
}

/// A resource could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{table}.{id}: {source}")]
pub struct BuildError {
    table: &'static str,
    id: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl Registry {
    /// Builds every resource of a validated config.
    pub fn build(config: &Config) -> Result<Self, BuildError> {
        let mut map: HashMap<ResourceKey, Arc<dyn Destination>> = HashMap::new();
        for (table, kind, resources) in config.resource_tables() {
            for (id, resource) in resources {
                let built: Result<Arc<dyn Destination>, Box<dyn std::error::Error + Send + Sync>> =
                    match resource {
                        ResourceConfig::File(c) => c
                            .build()
                            .map(|d| Arc::new(d) as Arc<dyn Destination>)
                            .map_err(Into::into),
                        ResourceConfig::Webhook(c) => c
                            .build()
                            .map(|d| Arc::new(d) as Arc<dyn Destination>)
                            .map_err(Into::into),
                    };
                let destination = built.map_err(|source| BuildError {
                    table,
                    id: id.clone(),
                    source,
                })?;
                map.insert((kind, id.clone()), destination);
            }
        }
        Ok(Self { map })
    }

    /// The destination serving a resource.
    pub fn get(&self, kind: DestKind, id: &str) -> Option<&Arc<dyn Destination>> {
        self.map.get(&(kind, id.to_string()))
    }

    /// Adds or replaces a destination (tests and embedders).
    pub fn insert(
        &mut self,
        kind: DestKind,
        id: impl Into<String>,
        destination: Arc<dyn Destination>,
    ) {
        self.map.insert((kind, id.into()), destination);
    }

    /// All resources.
    pub fn iter(&self) -> impl Iterator<Item = (&ResourceKey, &Arc<dyn Destination>)> {
        self.map.iter()
    }
}
