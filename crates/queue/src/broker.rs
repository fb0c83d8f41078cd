//! The RabbitMQ backend, so that several nonstop nodes can share one queue. Per queue NAME: a quorum queue
//! `nonstop.NAME` (dead-lettered to `nonstop.NAME.dead`), a retry queue `nonstop.NAME.retry` whose messages wait
//! out their back-off (per-message TTL) and then dead-letter back to the main queue, and the dead-letter queue.
//! Publishes are persistent and `mandatory`, on a channel with publisher confirms; a publish counts only once the
//! broker confirmed it. The connection lives on one runtime (the queue's thread); callers talk to it through
//! [`Broker`], which reconnects after a failure and sends an unconfirmed publish again.

use std::time::Duration;

use lapin::options::{
    BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// A message header carrying the number of deliveries already tried.
pub const ATTEMPTS_HEADER: &str = "x-nonstop-attempts";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not confirm the message (nack)")]
    Nacked,
    #[error("RabbitMQ returned the message: no queue took it")]
    Returned,
}

/// Names of one queue's broker queues.
#[derive(Debug, Clone)]
pub struct Names {
    pub main: String,
    pub retry: String,
    pub dead: String,
}

impl Names {
    pub fn of(queue: &str) -> Names {
        Names {
            main: format!("nonstop.{queue}"),
            retry: format!("nonstop.{queue}.retry"),
            dead: format!("nonstop.{queue}.dead"),
        }
    }
}

/// A connection and a confirming channel, with the queues declared.
pub struct Link {
    pub conn: Connection,
    pub channel: Channel,
}

impl Link {
    /// Connects and declares the queues; the main queue refuses publishes (nack) past `length_max` messages or
    /// `bytes_max` bytes.
    pub async fn open(
        url: &str,
        names: &Names,
        prefetch: u16,
        length_max: u64,
        bytes_max: u64,
    ) -> Result<Link, BrokerError> {
        let conn = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        let mut main = FieldTable::default();
        main.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        main.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        main.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(names.dead.as_str().into()));
        main.insert("x-max-length".into(), AMQPValue::LongLongInt(length_max.min(i64::MAX as u64) as i64));
        main.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(bytes_max.min(i64::MAX as u64) as i64));
        main.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        channel.queue_declare(names.main.as_str().into(), durable, main).await?;
        let mut retry = FieldTable::default();
        retry.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        retry.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(names.main.as_str().into()));
        channel.queue_declare(names.retry.as_str().into(), durable, retry).await?;
        let mut dead = FieldTable::default();
        dead.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        channel.queue_declare(names.dead.as_str().into(), durable, dead).await?;
        Ok(Link { conn, channel })
    }

    /// Publishes one persistent message to `queue` and waits for the broker's confirm. `delay` (for the retry
    /// queue) sets the message's TTL.
    pub async fn publish(
        &self,
        queue: &str,
        message_id: &str,
        attempts: u32,
        body: &[u8],
        delay: Option<Duration>,
    ) -> Result<(), BrokerError> {
        let mut headers = FieldTable::default();
        headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongUInt(attempts));
        let mut props =
            BasicProperties::default().with_delivery_mode(2).with_message_id(message_id.into()).with_headers(headers);
        if let Some(d) = delay {
            props = props.with_expiration(d.as_millis().max(1).to_string().into());
        }
        let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm = self.channel.basic_publish("".into(), queue.into(), opts, body, props).await?.await?;
        if !confirm.is_ack() {
            return Err(BrokerError::Nacked);
        }
        if confirm.take_message().is_some() {
            return Err(BrokerError::Returned);
        }
        Ok(())
    }

    /// Messages waiting in `queue`.
    pub async fn depth(&self, queue: &str) -> Result<u32, BrokerError> {
        let opts = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
        Ok(self.channel.queue_declare(queue.into(), opts, FieldTable::default()).await?.message_count())
    }

    pub async fn purge(&self, queue: &str) -> Result<u32, BrokerError> {
        Ok(self.channel.queue_purge(queue.into(), QueuePurgeOptions::default()).await?)
    }
}

/// Rejects a delivery without requeueing it: the main queue dead-letters it.
pub fn dead_letter_options() -> BasicNackOptions {
    BasicNackOptions { requeue: false, ..Default::default() }
}

/// The attempts header of a delivery.
pub fn attempts_of(props: &BasicProperties) -> u32 {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ATTEMPTS_HEADER))
        .and_then(|v| match v {
            AMQPValue::LongUInt(n) => Some(*n),
            AMQPValue::LongLongInt(n) => Some(*n as u32),
            AMQPValue::LongInt(n) => Some(*n as u32),
            _ => None,
        })
        .unwrap_or(0)
}
