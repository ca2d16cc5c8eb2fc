//! The MQTT connection: one event loop task per connection, correlating
//! each publish with its PUBACK by packet id.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Outgoing, Packet, QoS, Transport,
};
use tokio::sync::{Mutex, oneshot};

use super::{MqttError, encode};
use crate::destination::OutgoingRecord;
use crate::destination::reconnect::{ConnectFailure, Reconnect};

pub struct Settings {
    pub endpoint: super::config::Endpoint,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca: Option<Vec<u8>>,
    pub topic: String,
    pub max_packet: usize,
    pub keep_alive: Duration,
}

type Waiter = oneshot::Sender<Result<(), MqttError>>;

#[derive(Default)]
struct Pending {
    /// Publishes handed to the client, in order, not yet written.
    queued: VecDeque<Waiter>,
    /// Written publishes by packet id, waiting for PUBACK.
    inflight: HashMap<u16, Waiter>,
}

#[derive(Clone)]
struct Conn {
    client: AsyncClient,
    pending: Arc<Mutex<Pending>>,
    alive: Arc<AtomicBool>,
}

pub struct Client {
    settings: Settings,
    conn: Reconnect<Conn>,
    /// Serializes "queue the waiter, then hand the publish to the client",
    /// so waiters and packet ids line up.
    order: Mutex<()>,
}

impl Client {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            conn: Reconnect::default(),
            order: Mutex::new(()),
        }
    }

    fn options(&self) -> MqttOptions {
        let s = &self.settings;
        let mut o = MqttOptions::new(&s.client_id, &s.endpoint.host, s.endpoint.port);
        o.set_keep_alive(s.keep_alive)
            .set_max_packet_size(s.max_packet + 1024, s.max_packet + 1024)
            .set_clean_session(true);
        if let (Some(u), p) = (&s.username, &s.password) {
            o.set_credentials(u, p.clone().unwrap_or_default());
        }
        if s.endpoint.tls
            && let Some(ca) = &s.ca
        {
            o.set_transport(Transport::tls(ca.clone(), None, None));
        }
        o
    }

    /// Connects: waits for the CONNACK, then keeps polling in a task.
    async fn connect(&self) -> Result<Conn, MqttError> {
        let (client, mut events) = AsyncClient::new(self.options(), 256);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack)))
                    if ack.code == ConnectReturnCode::Success =>
                {
                    break;
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    return Err(MqttError::Refused(format!("{:?}", ack.code)));
                }
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                    return Err(MqttError::Refused(format!("{code:?}")));
                }
                Err(e) => return Err(MqttError::Connection(e.to_string())),
            }
        }
        let pending = Arc::new(Mutex::new(Pending::default()));
        let alive = Arc::new(AtomicBool::new(true));
        let conn = Conn {
            client,
            pending: pending.clone(),
            alive: alive.clone(),
        };
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        let mut p = pending.lock().await;
                        if let Some(w) = p.queued.pop_front() {
                            p.inflight.insert(pkid, w);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(w) = pending.lock().await.inflight.remove(&ack.pkid) {
                            let _ = w.send(Ok(()));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Throw the connection away: fail everything waiting
                        // (the dispatcher retries it with the same id).
                        alive.store(false, Ordering::SeqCst);
                        let mut p = pending.lock().await;
                        let reason = e.to_string();
                        let mut waiters: Vec<Waiter> = p.queued.drain(..).collect();
                        waiters.extend(p.inflight.drain().map(|(_, w)| w));
                        for w in waiters {
                            let _ = w.send(Err(MqttError::Connection(reason.clone())));
                        }
                        tracing::warn!(error = %reason, "MQTT connection lost");
                        return;
                    }
                }
            }
        });
        Ok(conn)
    }

    async fn cached(&self) -> Result<Conn, MqttError> {
        self.conn.get(|| self.connect()).await.map_err(|e| match e {
            ConnectFailure::Paused(d, why) => MqttError::Paused(d, why),
            ConnectFailure::Failed(e) => e,
        })
    }

    async fn conn(&self) -> Result<Conn, MqttError> {
        let conn = self.cached().await?;
        if conn.alive.load(Ordering::SeqCst) {
            return Ok(conn);
        }
        self.conn.reset().await;
        self.cached().await
    }

    pub async fn publish(&self, record: &OutgoingRecord) -> Result<(), MqttError> {
        if record.body.len() > self.settings.max_packet {
            return Err(MqttError::TooLarge {
                size: record.body.len(),
                max: self.settings.max_packet,
            });
        }
        let conn = self.conn().await?;
        let topic = encode::topic(&self.settings.topic, record);
        let (done, wait) = oneshot::channel();
        {
            let _order = self.order.lock().await;
            conn.pending.lock().await.queued.push_back(done);
            if conn
                .client
                .publish(topic, QoS::AtLeastOnce, false, record.body.to_vec())
                .await
                .is_err()
            {
                conn.pending.lock().await.queued.pop_back();
                return Err(MqttError::ClientStopped);
            }
        }
        wait.await.unwrap_or(Err(MqttError::ClientStopped))
    }

    pub async fn check(&self) -> Result<(), MqttError> {
        self.conn().await.map(|_| ())
    }
}
