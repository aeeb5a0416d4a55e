mod actions;
mod listener;
mod parser;
mod push;
mod search;
mod support;
