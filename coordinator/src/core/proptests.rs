//! Property tests of the task lifecycle over random event sequences.
