//! (in progress: real-dataset readers)
