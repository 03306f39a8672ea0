"""An HTTP worker process: from fork to exit, the uvicorn glue, app interface detection, the health path."""
