mod parser;
mod support;
