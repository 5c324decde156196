//! The saga of one order as a pure state machine: [`transition::apply`] takes the saga and an
//! input and returns the next saga and the commands to send. No I/O happens here; the caller
//! persists the result, the history and the commands in one transaction.

pub mod state;
pub mod transition;

pub use state::{Compensation, Line, OrderDetails, Saga, SagaState};
pub use transition::{apply, Command, Input, Outcome, Transition};
