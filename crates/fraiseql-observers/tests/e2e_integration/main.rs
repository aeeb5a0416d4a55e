mod actions;
mod listener;
mod parser;
mod support;
