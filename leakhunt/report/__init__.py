"""How findings leave the terminal: HTML and Markdown post-mortems of a recording, JUnit XML and
GitHub Actions output of the CI gate. Submodules import their heavy dependencies themselves."""
