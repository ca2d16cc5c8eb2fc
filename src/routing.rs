//! Routing: where a record goes (SPEC section 2). A destination as routes
//! and events name it ([`DestSpec`], the OCI shape), the configured routes,
//! and the precedence between them. Pure: no I/O. `record` and `api` use it
//! without depending on the configuration module.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::record::{DestKind, DestinationType};

/// A destination as routes and events name it (the OCI shape).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum DestSpec {
    /// No record is sent.
    #[serde(rename = "NONE")]
    None,
    /// A queue resource, with an optional channel.
    #[serde(rename = "QUEUE")]
    Queue {
        /// Key of a `[queues.*]` table.
        #[serde(rename = "queueId")]
        queue_id: String,
        /// Channel within the queue (OCI Queue channel, AMQP routing key).
        #[serde(rename = "channelId", default, skip_serializing_if = "Option::is_none")]
        channel_id: Option<String>,
    },
    /// A stream resource.
    #[serde(rename = "STREAM")]
    Stream {
        /// Key of a `[streams.*]` table.
        #[serde(rename = "streamId")]
        stream_id: String,
    },
    /// A notification topic resource.
    #[serde(rename = "NOTIFICATION")]
    Notification {
        /// Key of a `[topics.*]` table.
        #[serde(rename = "topicId")]
        topic_id: String,
    },
}

impl DestSpec {
    /// Kind and resource id, or `None` for `NONE`.
    pub fn target(&self) -> Option<(DestKind, &str)> {
        match self {
            DestSpec::None => None,
            DestSpec::Queue { queue_id, .. } => Some((DestKind::Queue, queue_id)),
            DestSpec::Stream { stream_id } => Some((DestKind::Stream, stream_id)),
            DestSpec::Notification { topic_id } => Some((DestKind::Notification, topic_id)),
        }
    }

    /// The channel of a QUEUE destination.
    pub fn channel(&self) -> Option<&str> {
        match self {
            DestSpec::Queue { channel_id, .. } => channel_id.as_deref(),
            _ => None,
        }
    }
}

/// One route: where success and failure records go. A missing side means NONE.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Destination of records with a 2xx status.
    pub success: Option<DestSpec>,
    /// Destination of records with any other status.
    pub failure: Option<DestSpec>,
}

/// `[routes]`: a function's entry wins, then its application's, then default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesConfig {
    /// Route for functions without a more specific one.
    #[serde(default)]
    pub default: Route,
    /// Routes by application id.
    #[serde(default)]
    pub applications: BTreeMap<String, Route>,
    /// Routes by function id.
    #[serde(default)]
    pub functions: BTreeMap<String, Route>,
}

/// The destination of one side of an event: its inline destination, else
/// the destinations its team set through the API (`team`), else its
/// function's route, else its application's, else the default. Per side,
/// the first that defines that side wins; `None` means NONE.
pub fn resolve(
    routes: &RoutesConfig,
    inline: Option<DestSpec>,
    team: Option<&Route>,
    function_id: &str,
    application_id: &str,
    dt: DestinationType,
) -> Option<DestSpec> {
    let side = |route: &Route| match dt {
        DestinationType::Success => route.success.clone(),
        DestinationType::Failure => route.failure.clone(),
    };
    inline
        .or_else(|| team.and_then(side))
        .or_else(|| routes.functions.get(function_id).and_then(side))
        .or_else(|| routes.applications.get(application_id).and_then(side))
        .or_else(|| side(&routes.default))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(id: &str) -> DestSpec {
        DestSpec::Stream {
            stream_id: id.into(),
        }
    }

    #[test]
    fn precedence_per_side() {
        let mut routes = RoutesConfig {
            default: Route {
                success: Some(stream("default")),
                failure: Some(stream("default-f")),
            },
            ..RoutesConfig::default()
        };
        routes.applications.insert(
            "app".into(),
            Route {
                success: Some(stream("app")),
                failure: None,
            },
        );
        routes.functions.insert(
            "fn".into(),
            Route {
                success: None,
                failure: Some(DestSpec::None),
            },
        );
        let ok = DestinationType::Success;
        let failed = DestinationType::Failure;
        assert_eq!(
            resolve(&routes, None, None, "fn", "app", ok),
            Some(stream("app"))
        );
        assert_eq!(
            resolve(&routes, None, None, "fn", "app", failed),
            Some(DestSpec::None)
        );
        assert_eq!(
            resolve(&routes, None, None, "x", "y", failed),
            Some(stream("default-f"))
        );
        assert_eq!(
            resolve(&routes, Some(stream("inline")), None, "fn", "app", ok),
            Some(stream("inline"))
        );
        // The team's API entry beats the configuration, per side; inline
        // beats it.
        let team = Route {
            success: None,
            failure: Some(stream("team")),
        };
        assert_eq!(
            resolve(&routes, None, Some(&team), "fn", "app", failed),
            Some(stream("team"))
        );
        assert_eq!(
            resolve(&routes, None, Some(&team), "fn", "app", ok),
            Some(stream("app")),
            "a side the team did not set falls through"
        );
        assert_eq!(
            resolve(
                &routes,
                Some(stream("inline")),
                Some(&team),
                "fn",
                "app",
                failed
            ),
            Some(stream("inline"))
        );
    }
}
