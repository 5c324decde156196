//! The audit's merge join: each service streams its items in order id order, and each stream
//! is read one item ahead, so that the items of one order are matched as they come, with a
//! few pages in memory whatever the number of orders.

use tonic::Streaming;
use uuid::Uuid;

use crate::Failure;

/// A stream of items in order id order, read one ahead to match with the others.
pub struct Sorted<T> {
    /// What is listed, e.g. "payments".
    what: &'static str,
    service: &'static str,
    url: String,
    stream: Streaming<T>,
    order_id: fn(&T) -> &str,
    head: Option<(Uuid, T)>,
    last: Option<Uuid>,
    /// Items read so far.
    pub count: u64,
}

impl<T> Sorted<T> {
    /// Opens `stream` of `what`, listed by `service` at `url`, whose items belong to the
    /// order `order_id` says; reads its first item.
    pub async fn open(
        (what, service, url): (&'static str, &'static str, &str),
        stream: Streaming<T>,
        order_id: fn(&T) -> &str,
    ) -> Result<Sorted<T>, Failure> {
        let mut sorted = Sorted {
            what,
            service,
            url: url.to_owned(),
            stream,
            order_id,
            head: None,
            last: None,
            count: 0,
        };
        sorted.advance().await?;
        Ok(sorted)
    }

    async fn advance(&mut self) -> Result<(), Failure> {
        let next = self.stream.message().await.map_err(|status| {
            Failure::Error(format!(
                "reading the {}: {}",
                self.what,
                Failure::from_status(self.service, &self.url, &status)
            ))
        })?;
        self.head = match next {
            None => None,
            Some(item) => {
                self.count += 1;
                let text = (self.order_id)(&item);
                let id = Uuid::parse_str(text).map_err(|_| {
                    Failure::Error(format!(
                        "{} listed {} with an invalid order id {text:?}",
                        self.service, self.what
                    ))
                })?;
                if self.last.is_some_and(|last| last >= id) {
                    return Err(Failure::Error(format!(
                        "{} does not list {} in order id order (at {id}): is it an older version?",
                        self.service, self.what
                    )));
                }
                self.last = Some(id);
                Some((id, item))
            }
        };
        Ok(())
    }

    /// The next item and its order id, in order id order.
    pub async fn next(&mut self) -> Result<Option<(Uuid, T)>, Failure> {
        let head = self.head.take();
        if head.is_some() {
            self.advance().await?;
        }
        Ok(head)
    }

    /// The item of `order_id`, passing over those of orders before it.
    pub async fn take(&mut self, order_id: Uuid) -> Result<Option<T>, Failure> {
        while self.head.as_ref().is_some_and(|(id, _)| *id < order_id) {
            self.advance().await?;
        }
        if self.head.as_ref().is_none_or(|(id, _)| *id != order_id) {
            return Ok(None);
        }
        let item = self.head.take().map(|(_, item)| item);
        self.advance().await?;
        Ok(item)
    }

    /// Reads what is left, to count it.
    pub async fn drain(&mut self) -> Result<(), Failure> {
        while self.head.is_some() {
            self.advance().await?;
        }
        Ok(())
    }
}
