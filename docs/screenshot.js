// Screenshot of the asset graph for the README, in headless Chromium (Debian's package).
//   npm install playwright-core   (outside the project)
//   prefpack run && prefpack ui --port 3456 &
//   node docs/screenshot.js http://127.0.0.1:3456 docs/asset_graph.png
const { chromium } = require('playwright-core');

(async () => {
  const [base, out] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    // No background networking: this machine's network is closed.
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage({ viewport: { width: 1800, height: 640 } });
  const url = `${base}/assets/trained_model?view=lineage&lineageScope=upstream&lineageDepth=10`;
  await page.goto(url, { waitUntil: 'networkidle' });
  await page.waitForTimeout(4000);
  const skip = page.getByRole('button', { name: 'Skip' }); // the first-visit newsletter modal
  if (await skip.count()) {
    await skip.click();
    await page.waitForTimeout(6000);
  }
  await page.screenshot({ path: out });
  await browser.close();
})();
