//! SQL of the inventory, one module per table family. Functions take the caller's connection
//! (the consumer's inbox transaction, or one from the pool) unless they own a transaction.
//!
//! Lock order, everywhere: the reservation row first, then the stock rows in SKU order, so that
//! concurrent reservations, commits, releases and the sweep never deadlock each other.

pub mod reservations;
pub mod stock;
