mod allocator;
mod demo;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    demo::run(std::env::var("DATABASE_URL").ok()).await
}
