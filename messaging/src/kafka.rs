//! Broker settings shared by every service, the clients built from them, and topic creation.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;

/// Kafka settings, flattened into every service's command line.
#[derive(clap::Args, Clone, Debug)]
pub struct KafkaArgs {
    /// Bootstrap brokers, comma separated.
    #[arg(
        long = "kafka-brokers",
        env = "KAFKA_BROKERS",
        default_value = "localhost:9092"
    )]
    pub brokers: String,

    /// Prefix of every topic and consumer group name, to run several platforms on one broker.
    #[arg(
        long = "kafka-topic-prefix",
        env = "KAFKA_TOPIC_PREFIX",
        default_value = ""
    )]
    pub topic_prefix: String,

    /// Partitions of the topics this service creates at start.
    #[arg(long = "kafka-partitions", env = "KAFKA_PARTITIONS", default_value_t = 3,
          value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub partitions: i32,

    /// Longest time the broker may hold a fetch when there is nothing to return. Apache Kafka
    /// answers a waiting fetch as soon as a message arrives, so a long wait costs no latency
    /// and keeps idle consumers from polling; lower it only for a broker that holds every fetch
    /// this long.
    #[arg(
        long = "kafka-fetch-wait-max-ms",
        env = "KAFKA_FETCH_WAIT_MAX_MS",
        default_value_t = 500
    )]
    pub fetch_wait_max_ms: u32,

    /// How long the broker waits for a consumer's heartbeat before giving its partitions to
    /// the other members of its group: the time a killed replica's partitions stand still.
    /// The broker's `group.min.session.timeout.ms` must allow it.
    #[arg(long = "kafka-session-timeout-ms", env = "KAFKA_SESSION_TIMEOUT_MS", default_value_t = 6000,
          value_parser = clap::value_parser!(u32).range(1000..=300_000))]
    pub session_timeout_ms: u32,

    /// This replica's stable name in its consumer groups (Kafka's static membership,
    /// `group.instance.id`): a replica that restarts under the same name (a pod of a
    /// StatefulSet, a process a supervisor restarts) takes its partitions back at once, and
    /// after a broker restart every replica rejoins without waiting out the session timeout
    /// of its former self. Unique per replica; unset, the replica joins as a new member each
    /// time.
    #[arg(long = "kafka-group-instance-id", env = "KAFKA_GROUP_INSTANCE_ID")]
    pub group_instance_id: Option<String>,

    /// Producer linger: how long the relay's producer waits to fill a batch. The relay hands
    /// it a whole batch of rows at once, so waiting adds latency to every crossing (about a
    /// millisecond each at 1) and batches nothing more.
    #[arg(long = "kafka-linger-ms", env = "KAFKA_LINGER_MS", default_value_t = 0)]
    pub linger_ms: u32,

    /// Most messages a consumer handles in one database transaction.
    #[arg(long = "consumer-batch-max", env = "CONSUMER_BATCH_MAX", default_value_t = 128,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_max: u16,

    /// Under load (the consumer's last batch found more than one message waiting), how long
    /// it waits for more to join a batch: bigger batches cost less per message (one
    /// transaction, inbox and outbox statement each). A consumer that finds one message at a
    /// time never waits; 0 never waits.
    #[arg(long = "consumer-batch-linger-ms", env = "CONSUMER_BATCH_LINGER_MS", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub batch_linger_ms: u32,
}

impl KafkaArgs {
    /// The deployed name of a topic from [`proto::topics`].
    pub fn topic(&self, name: &str) -> String {
        format!("{}{}", self.topic_prefix, name)
    }

    /// The deployed name of a consumer group.
    pub fn group(&self, name: &str) -> String {
        format!("{}{}", self.topic_prefix, name)
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("socket.keepalive.enable", "true")
            // Nagle's algorithm holds small requests back for tens of milliseconds: every
            // message of a saga is small, and each waits on the one before.
            .set("socket.nagle.disable", "true")
            .set("log_level", "4");
        config
    }

    /// An idempotent producer: retries never duplicate nor reorder within a partition.
    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        self.client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", self.linger_ms.to_string())
            .set("message.timeout.ms", "30000")
            .create()
            .context("creating the Kafka producer")
    }

    /// A consumer in `group` (prefixed) that stores offsets only when told to: see
    /// [`crate::Consumer`].
    pub fn consumer(&self, group: &str) -> anyhow::Result<StreamConsumer> {
        self.consumer_config(group)
            .create()
            .context("creating the Kafka consumer")
    }

    /// Like [`KafkaArgs::consumer`], with a context of the caller's (librdkafka's statistics
    /// every few seconds, say).
    pub fn consumer_with_context<C: rdkafka::consumer::ConsumerContext + 'static>(
        &self,
        group: &str,
        context: C,
        statistics_interval: Duration,
    ) -> anyhow::Result<StreamConsumer<C>> {
        self.consumer_config(group)
            .set(
                "statistics.interval.ms",
                statistics_interval.as_millis().to_string(),
            )
            .create_with_context(context)
            .context("creating the Kafka consumer")
    }

    fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut config = self.client_config();
        config
            .set("group.id", self.group(group))
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "200")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", self.fetch_wait_max_ms.to_string())
            // The classic group protocol with incremental (cooperative) rebalances: a member
            // joining or leaving moves only the partitions that change hands, and the others
            // keep consuming meanwhile.
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (self.session_timeout_ms / 6).max(100).to_string(),
            );
        if let Some(instance) = self.group_instance_id.as_deref().filter(|i| !i.is_empty()) {
            config.set("group.instance.id", instance);
        }
        config
    }

    /// A health probe: the brokers answer a metadata request.
    pub fn probe(&self) -> anyhow::Result<runtime::health::Probe> {
        let client: Arc<BaseConsumer> = Arc::new(
            self.client_config()
                .create()
                .context("creating the Kafka client of the health probe")?,
        );
        Ok(runtime::health::Probe::new("kafka", move || {
            let client = client.clone();
            Box::pin(async move {
                tokio::task::spawn_blocking(move || {
                    client
                        .fetch_metadata(None, runtime::health::PROBE_TIMEOUT)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())?
            })
        }))
    }

    /// Creates the platform's topics and their dead-letter topics where missing.
    pub async fn ensure_topics(&self) -> anyhow::Result<()> {
        let names: Vec<String> = proto::topics::ALL
            .iter()
            .flat_map(|t| [self.topic(t), proto::topics::dead_letter(&self.topic(t))])
            .collect();
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .context("creating the Kafka admin client")?;
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|name| NewTopic::new(name, self.partitions, TopicReplication::Fixed(1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(&topics, &options)
            .await
            .with_context(|| format!("creating topics on {}", self.brokers))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
            }
        }
        Ok(())
    }
}
